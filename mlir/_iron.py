"""Glue shared by the IRON designs in ``mlir/``: toolchain loading, API differences, the
runtime sequence and the command line.

Why a module: every design turns a tiling from :mod:`npu.xdna.tiling` into the same kinds of
IRON objects (fifos, workers, a runtime sequence of task groups), and must fail the same clear
way when the ``aie`` package is missing. Keeping that here keeps each design file about its
own data flow.

Written against the IRON API of mlir-aie 1.3.x (``aie.iron``: Program, Runtime, Worker,
ObjectFifo, Kernel; ``aie.helpers.taplib.TensorAccessPattern``); the few names that moved
between releases (``ObjectFifo(depth=...)`` vs ``default_depth``, ``Buffer`` vs
``GlobalBuffer``, ``NPU1Col4`` vs ``NPU1``) are looked up, not assumed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from npu.xdna.tiling import DTYPES, FIFO_DEPTH, DesignError, HostBuffer, Transfer  # noqa: E402

MLIR_AIE_VERSION = "1.3.4"
INSTALL_HINT = (
    f"install it with: python3 -m pip install mlir_aie=={MLIR_AIE_VERSION} "
    f"-f https://github.com/Xilinx/mlir-aie/releases/expanded_assets/v{MLIR_AIE_VERSION} "
    "(see mlir/README.md for the pinned Peano and XRT)"
)


class IronMissing(RuntimeError):
    """The mlir-aie IRON Python package (``aie``) cannot be imported."""


def load_iron() -> SimpleNamespace:
    """The IRON names the designs use, or :class:`IronMissing` saying what failed to import."""
    try:
        import aie.iron as iron
        from aie.helpers.taplib import TensorAccessPattern
        from aie.iron import Kernel, ObjectFifo, Program, Runtime, Worker
        from aie.iron import device as device_mod
        from aie.iron.controlflow import range_
        from aie.iron.placers import SequentialPlacer
    except ImportError as e:
        raise IronMissing(str(e)) from e
    buffer = getattr(iron, "Buffer", None) or getattr(iron, "GlobalBuffer", None)
    npu1 = getattr(device_mod, "NPU1Col4", None) or getattr(device_mod, "NPU1", None)
    if buffer is None or npu1 is None:
        raise IronMissing("aie.iron has neither Buffer nor GlobalBuffer, or no NPU1Col4/NPU1 device")
    return SimpleNamespace(
        Buffer=buffer,
        Kernel=Kernel,
        ObjectFifo=ObjectFifo,
        Program=Program,
        Runtime=Runtime,
        SequentialPlacer=SequentialPlacer,
        TensorAccessPattern=TensorAccessPattern,
        Tile=device_mod.Tile,
        Worker=Worker,
        npu1=npu1,
        range_=range_,
    )


def flat(elements: int, dtype: str) -> Any:
    """A 1-D buffer type: the kernels take flat, row-major pointers."""
    return np.ndarray[(int(elements),), np.dtype[DTYPES[dtype]]]


def fifo(ir: SimpleNamespace, obj_type: Any, name: str, depth: int = FIFO_DEPTH) -> Any:
    """An ObjectFifo, whichever keyword this release calls its depth."""
    params = inspect.signature(ir.ObjectFifo).parameters
    key = "depth" if "depth" in params else "default_depth"
    return ir.ObjectFifo(obj_type, name=name, **{key: depth})


def loop(ir: SimpleNamespace, n: int) -> Any:
    """A hardware loop of n trips; a Python loop for one (IRON's ``range_(1)`` is a known
    pitfall, mlir-aie issue #1547)."""
    return range(1) if n == 1 else ir.range_(n)


def as_list(x: Any, k: int) -> list:
    """``acquire(k)`` returns one buffer for k == 1 and an indexable group otherwise."""
    return [x] if k == 1 else [x[i] for i in range(k)]


def worker(ir: SimpleNamespace, fn: Callable, args: list, tile: tuple[int, int], stack: int | None = None) -> Any:
    """A Worker pinned to ``tile``; ``stack`` bytes if this release's Worker takes a stack size
    (else :func:`set_core_stacks` sets it on the emitted module)."""
    kw: dict[str, Any] = {"placement": ir.Tile(*tile)}
    if stack is not None and "stack_size" in inspect.signature(ir.Worker).parameters:
        kw["stack_size"] = stack
    return ir.Worker(fn, args, **kw)


@dataclass
class Parts:
    """What one design (or half of one) contributes to a program: its workers, the host-side
    fifo handles by name, and the stack each core needs beyond the default."""

    workers: list = field(default_factory=list)
    prod: dict[str, Any] = field(default_factory=dict)
    cons: dict[str, Any] = field(default_factory=dict)
    stacks: dict[tuple[int, int], int] = field(default_factory=dict)


def program(
    ir: SimpleNamespace, parts: Sequence[Parts], buffers: Sequence[HostBuffer], waves: Sequence[Sequence[Transfer]]
) -> Any:
    """The MLIR module: start every worker, then each wave as one task group whose drains are
    awaited before the next wave reuses the shim BDs."""
    prod = {k: v for p in parts for k, v in p.prod.items()}
    cons = {k: v for p in parts for k, v in p.cons.items()}
    by_name = {b.name: b for b in buffers}
    rt = ir.Runtime()
    with rt.sequence(*[flat(b.elements, b.dtype) for b in buffers]) as args:
        handles = dict(zip([b.name for b in buffers], args if len(buffers) > 1 else [args], strict=True))
        rt.start(*[w for p in parts for w in p.workers])
        for wave in waves:
            tg = rt.task_group()
            for tr in wave:
                pat = tr.pattern
                tap = ir.TensorAccessPattern(
                    (by_name[tr.buffer].elements,), pat.offset, list(pat.sizes), list(pat.strides)
                )
                shim = ir.Tile(tr.column, 0)
                if tr.fill:
                    rt.fill(prod[tr.fifo], handles[tr.buffer], tap=tap, task_group=tg, placement=shim)
                else:
                    rt.drain(cons[tr.fifo], handles[tr.buffer], tap=tap, task_group=tg, wait=True, placement=shim)
            rt.finish_task_group(tg)
    module = ir.Program(ir.npu1(), rt).resolve_program(ir.SequentialPlacer())
    stacks = {k: v for p in parts for k, v in p.stacks.items()}
    if stacks and "stack_size" not in inspect.signature(ir.Worker).parameters:
        set_core_stacks(module, stacks)
    return module


def set_core_stacks(module: Any, stacks: dict[tuple[int, int], int]) -> None:
    """Set ``stack_size`` on the ``aie.core`` of each (column, row) in ``stacks``."""
    from aie.ir import IntegerAttr, IntegerType

    with module.context:
        i32 = IntegerType.get_signless(32)
        for dev in module.body.operations:
            if dev.operation.name != "aie.device":
                continue
            for op in dev.regions[0].blocks[0].operations:
                if op.operation.name != "aie.core":
                    continue
                tile = op.operation.operands[0].owner
                where = (IntegerAttr(tile.attributes["col"]).value, IntegerAttr(tile.attributes["row"]).value)
                if where in stacks:
                    op.operation.attributes["stack_size"] = IntegerAttr.get(i32, stacks[where])


def main(
    name: str,
    parser: argparse.ArgumentParser,
    make_tiling: Callable[[argparse.Namespace], Any],
    emit: Callable[[SimpleNamespace, Any], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse, build and check the tiling, then print the MLIR (or the tiling with
    ``--tiling-json``). Exits 1 on an invalid tiling, 3 without the ``aie`` package."""
    parser.add_argument("--tiling-json", action="store_true", help="print the tiling as JSON; needs no toolchain")
    args = parser.parse_args(argv)
    try:
        tiling = make_tiling(args)
        tiling.check()
    except DesignError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    if args.tiling_json:
        print(json.dumps(tiling.to_dict(), indent=1))
        return 0
    try:
        ir = load_iron()
    except IronMissing as e:
        print(
            f"{name}: cannot emit MLIR: the mlir-aie IRON Python package `aie` is not importable ({e}); {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 3
    print(emit(ir, tiling))
    return 0
