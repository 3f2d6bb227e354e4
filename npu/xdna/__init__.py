"""The xdna backend's npu1 (Phoenix, XDNA1) pieces: tilings of the mlir/ designs and their runtime."""
