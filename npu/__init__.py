"""The NPU runtime: golden numerics of the AIE2 kernels, the quantised model, and the ``xdna`` and
``golden`` backends of :mod:`whisper_engine`'s backend interface, with the npu1 tilings and the
pyxrt host runtime behind them."""
