"""A fake ``pyxrt``: XRT's Python API (device, xclbin, hw_context, kernel, bo, run, runlist) over
an "NPU" that runs the golden kernel models (:mod:`npu.golden`).

It follows the real bindings' calls and signatures, and enforces what the hardware would:
- host and device memory are separate: a kernel reads only what was synced to the device, and a
  ``read`` of device-written bytes that were not synced back raises;
- at most 6 hardware contexts live at once; a kernel must belong to its context's xclbin;
- runs execute in submission order on one device thread, asynchronously to the host;
- access patterns are bounds-checked against their buffer objects.

It understands only the synthetic instruction streams of :mod:`npu.xdna.artifacts`; ``EVENTS``
records syncs and runs in order (tests check dispatch counts and double buffering with it).
"""

from __future__ import annotations

import enum
import json
import os
import queue
import threading
import time
import uuid as _uuid
import weakref

import numpy as np

from npu import golden
from npu.xdna.artifacts import ABI as _ABI
from npu.xdna.artifacts import OUTPUTS as _OUTPUTS
from npu.xdna.artifacts import decode_synthetic

MAX_CONTEXTS = 6
EVENTS: list[tuple] = []
RUN_DELAY_S = 0.0  # extra time each run takes on the "device" (to observe overlap)
FAIL_OPS: set[str] = set()  # runs of these ops end in ERT_CMD_STATE_ERROR (fault injection)
FAIL_AFTER: int | None = None  # ... and every run after this many more have completed
_completed = 0
_live_contexts = 0
_lock = threading.Lock()


def reset() -> None:
    global RUN_DELAY_S, FAIL_AFTER
    EVENTS.clear()
    FAIL_OPS.clear()
    RUN_DELAY_S = 0.0
    FAIL_AFTER = None


def fail_after(runs: int) -> None:
    """Every run fails once ``runs`` more have completed (a device that stops working)."""
    global FAIL_AFTER, _completed
    FAIL_AFTER, _completed = runs, 0


def _event(*e) -> None:
    with _lock:
        EVENTS.append(e)


class xclBOSyncDirection(enum.Enum):
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1


class ert_cmd_state(enum.Enum):
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5


class uuid:
    def __init__(self, text: str) -> None:
        self._text = text

    def to_string(self) -> str:
        return self._text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, uuid) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)


class _XclbinKernel:
    def __init__(self, name: str) -> None:
        self._name = name

    def get_name(self) -> str:
        return self._name


class xclbin:
    def __init__(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("fake_xclbin") != 1:
            raise RuntimeError(f"{path}: not an xclbin this device can load")
        self._uuid = uuid(meta["uuid"])
        self.ops: dict[str, str] = meta["kernels"]  # kernel name -> op

    def get_uuid(self) -> uuid:
        return self._uuid

    def get_kernels(self) -> list[_XclbinKernel]:
        return [_XclbinKernel(n) for n in self.ops]


class device:
    def __init__(self, index: int = 0) -> None:
        if index != 0:
            raise RuntimeError(f"no device {index}")
        self._registered: dict[uuid, xclbin] = {}
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, daemon=True, name="fake-npu").start()

    def register_xclbin(self, x: xclbin) -> uuid:
        self._registered[x.get_uuid()] = x
        return x.get_uuid()

    def _serve(self) -> None:
        while True:
            self._queue.get()._execute()  # holds no run (nor its context) between runs


class hw_context:
    def __init__(self, dev: device, xclbin_uuid: uuid) -> None:
        global _live_contexts
        if xclbin_uuid not in dev._registered:
            raise RuntimeError("hw_context: xclbin not registered")
        with _lock:
            if _live_contexts >= MAX_CONTEXTS:
                raise RuntimeError(f"hw_context: no more than {MAX_CONTEXTS} contexts")
            _live_contexts += 1
        self._device = dev
        self._xclbin = dev._registered[xclbin_uuid]
        weakref.finalize(self, _context_freed)
        _event("context", xclbin_uuid.to_string())


def _context_freed() -> None:
    global _live_contexts
    with _lock:
        _live_contexts -= 1


class _Memory:
    """One allocation: host and device copies, and which bytes are out of step."""

    def __init__(self, size: int) -> None:
        self.host = np.zeros(size, np.uint8)
        self.device = np.zeros(size, np.uint8)
        self.host_dirty = np.zeros(size, bool)  # written on the host, not synced to the device
        self.device_dirty = np.zeros(size, bool)  # written by a kernel, not synced to the host


class bo:
    class flags(enum.Enum):
        normal = 0
        cacheable = 1
        device_only = 2
        host_only = 3

    normal, cacheable, device_only, host_only = flags.normal, flags.cacheable, flags.device_only, flags.host_only

    def __init__(self, *args) -> None:
        if isinstance(args[0], bo):  # sub-buffer: (parent, size, offset)
            parent, size, offset = args
            if offset < 0 or offset + size > parent._size:
                raise RuntimeError("sub-buffer outside its parent")
            self._mem, self._base, self._size = parent._mem, parent._base + offset, size
        else:
            _dev, size, _flags, _group = args
            self._mem, self._base, self._size = _Memory(size), 0, size

    def size(self) -> int:
        return self._size

    def _range(self, size: int | None, offset: int) -> slice:
        size = self._size - offset if size is None else size
        if offset < 0 or offset + size > self._size:
            raise RuntimeError("access outside the buffer object")
        return slice(self._base + offset, self._base + offset + size)

    def write(self, data, seek: int) -> None:
        raw = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        r = self._range(len(raw), seek)
        self._mem.host[r] = raw
        self._mem.host_dirty[r] = True

    def read(self, size: int, skip: int) -> np.ndarray:
        r = self._range(size, skip)
        if self._mem.device_dirty[r].any():
            raise RuntimeError("read of device-written bytes that were not synced from the device")
        return self._mem.host[r].view(np.int8).copy()

    def map(self) -> memoryview:
        return memoryview(self._mem.host[self._base : self._base + self._size])

    def sync(self, direction: xclBOSyncDirection, size: int | None = None, offset: int = 0) -> None:
        r = self._range(size, offset)
        m = self._mem
        if direction is xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
            m.device[r] = m.host[r]
            m.host_dirty[r] = False
            _event("to_device", id(m), r.start, r.stop)
        else:
            m.host[r] = m.device[r]
            m.device_dirty[r] = False
            _event("from_device", id(m), r.start, r.stop)


class kernel:
    def __init__(self, context: hw_context, name: str) -> None:
        if name not in context._xclbin.ops:
            raise RuntimeError(f"kernel {name} is not in the context's xclbin")
        self._context = context
        self.op = context._xclbin.ops[name]

    def group_id(self, index: int) -> int:
        return index

    def __call__(self, *args) -> run:
        r = run(self)
        for i, a in enumerate(args):
            r.set_arg(i, a)
        r.start()
        return r


def _view(b: bo, dtype: str, kind: str, call, operand) -> np.ndarray:
    """The operand's elements as a strided ``[batch, rows, cols]`` (or ``[batch, len]``) view of
    the buffer's device memory, bounds-checked."""
    dims = {"m": call.m, "k": call.k, "n": call.n}
    item = np.dtype(dtype).itemsize
    if b._base % item:
        raise RuntimeError("buffer object not aligned for its element type")
    flat = b._mem.device[b._base : b._base + b._size].view(dtype)
    if len(kind) == 2:
        shape = (call.batch, dims[kind[0]], dims[kind[1]])
        strides = (operand.batch, operand.row, operand.col)
    else:
        shape = (call.batch, dims[kind])
        strides = (operand.batch, operand.row if kind == "m" else operand.col)
    last = operand.offset + sum((s - 1) * st for s, st in zip(shape, strides, strict=True))
    if operand.offset < 0 or min(strides) < 0 or last >= len(flat):
        raise RuntimeError(f"{call.op}: access pattern outside its buffer ({last} >= {len(flat)} elements)")
    return np.lib.stride_tricks.as_strided(
        flat[operand.offset :], shape=shape, strides=tuple(s * item for s in strides), writeable=True
    )


def _compute(op: str, v: list, batch: int) -> None:
    for i in range(batch):
        x = [None if a is None else a[i] for a in v]
        if op == "gemm":
            x[2][...] = golden.gemm(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]))
        elif op == "gemm_i16":
            x[2][...] = golden.gemm_i16(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]))
        elif op in ("quantize", "quantize_i16"):
            fn = golden.quantize_rows if op == "quantize" else golden.quantize_rows_i16
            x[1][...], x[2][...] = fn(x[0])
        elif op == "dequant":
            x[5][...] = golden.dequant(x[0], x[1], x[2], x[3], x[4])
        elif op == "requant":
            x[3][...] = golden.requant(x[0], x[1], x[2])
        elif op == "softmax":
            x[3][...] = golden.softmax(np.ascontiguousarray(x[0]), x[1], x[2])
        elif op == "layernorm":
            x[3][...] = golden.layernorm(x[0], x[1], x[2])
        elif op == "gelu":
            x[2][...] = golden.gelu(x[0], x[1])
        elif op == "dft":
            x[2][...] = golden.dft(np.ascontiguousarray(x[0]), np.ascontiguousarray(x[1]))
        elif op == "mel_log":
            x[1][...] = golden.mel_log(np.ascontiguousarray(x[0]))


class run:
    def __init__(self, k: kernel) -> None:
        self._kernel = k
        self._args: dict[int, object] = {}
        self._state = ert_cmd_state.ERT_CMD_STATE_NEW
        self._done = threading.Event()
        self.error: str | None = None

    def set_arg(self, index: int, value) -> None:
        self._args[index] = value

    def start(self) -> None:
        self._state = ert_cmd_state.ERT_CMD_STATE_QUEUED
        self._done.clear()
        self._kernel._context._device._queue.put(self)

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        self._done.wait(None if not timeout_ms else timeout_ms / 1000)
        return self._state

    def state(self) -> ert_cmd_state:
        return self._state

    def _execute(self) -> None:
        try:
            self._run()
            self._state = ert_cmd_state.ERT_CMD_STATE_COMPLETED
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self._state = ert_cmd_state.ERT_CMD_STATE_ERROR
            _event("error", self._kernel.op, self.error)
        self._done.set()

    def _run(self) -> None:
        a = self._args
        if a.get(0) != 3:
            raise RuntimeError("opcode must be 3")
        instr, words = a[1], a[2]
        r = instr._range(4 * words, 0)
        if instr._mem.host_dirty[r].any():
            raise RuntimeError("instruction buffer written but not synced to the device")
        call = decode_synthetic(instr._mem.device[r].view(np.uint32))
        if call.op != self._kernel.op:
            raise RuntimeError(f"instructions for {call.op} sent to the {self._kernel.op} kernel")
        _event("run_start", call.op)
        global _completed
        if call.op in FAIL_OPS or (FAIL_AFTER is not None and _completed >= FAIL_AFTER):
            raise RuntimeError(f"injected fault in {call.op}")
        _completed += 1
        views: list = []
        for i, ((dtype, kind), operand) in enumerate(zip(_ABI[call.op], call.operands, strict=True)):
            if not operand.present:
                views.append(None)
                continue
            b = a.get(3 + i)
            if not isinstance(b, bo):
                raise RuntimeError(f"{call.op}: argument {3 + i} is not a buffer object")
            view = _view(b, dtype, kind, call, operand)
            if i not in _OUTPUTS[call.op] and b._mem.host_dirty[b._base : b._base + b._size].any():
                lo = b._base + operand.offset * np.dtype(dtype).itemsize
                hi = lo + view.nbytes if view.flags.c_contiguous else b._base + b._size
                if b._mem.host_dirty[lo:hi].any():
                    raise RuntimeError(f"{call.op}: input {i} written on the host but not synced to the device")
            views.append(view)
        _compute(call.op, views, call.batch)
        for i in _OUTPUTS[call.op]:
            b = a[3 + i]
            if views[i] is not None:
                b._mem.device_dirty[b._base : b._base + b._size] = True
        if RUN_DELAY_S:
            time.sleep(RUN_DELAY_S)
        _event("run_end", call.op)


class runlist:
    def __init__(self, context: hw_context) -> None:
        self._context = context
        self._runs: list[run] = []

    def add(self, r: run) -> None:
        if r._kernel._context is not self._context:
            raise RuntimeError("a runlist takes runs of its own hardware context only")
        self._runs.append(r)

    def execute(self) -> None:
        _event("runlist", len(self._runs))
        for r in self._runs:
            r.start()

    def wait(self) -> None:
        for r in self._runs:
            r.wait()


if os.environ.get("FAKE_PYXRT_FAIL_AFTER"):  # fault injection into a daemon run as a subprocess
    fail_after(int(os.environ["FAKE_PYXRT_FAIL_AFTER"]))


def make_artifacts(root, stages: dict[str, list[str]] | None = None) -> None:
    """Write a fake artifacts folder: one fake xclbin per stage and a synthetic manifest."""
    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["gemm", "gemm_i16", "quantize", "quantize_i16", "dequant", "softmax", "layernorm", "gelu"]
    stages = stages or {"mel": ["dft", "mel_log"], "encoder": rows, "decoder": rows}
    xclbins = {}
    for stage, ops in stages.items():
        kernels = {op: op.upper() for op in ops}
        (root / f"{stage}.xclbin").write_text(
            json.dumps({"fake_xclbin": 1, "uuid": str(_uuid.uuid4()), "kernels": {v: k for k, v in kernels.items()}})
        )
        xclbins[stage] = {"path": f"{stage}.xclbin", "kernels": kernels}
    manifest = {"format": 1, "device": "npu1 (fake)", "instructions": "synthetic", "xclbins": xclbins}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
