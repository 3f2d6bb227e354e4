#!/usr/bin/env python3
"""Build the npu1 artifacts of the xdna backend: one ``.xclbin`` + ``insts.bin`` per design and
shape, and a ``manifest.json`` describing them.

Why a script: the artifacts need the AIE toolchain (mlir-aie's ``aie`` Python package and
``aiecc.py``, Peano/llvm-aie, XRT's ``xclbinutil``), which the build machines do not have. On a
box that has it this compiles kernels/*.cc for AIE2 with Peano, runs each design in mlir/ for
each Whisper tiny.en shape (from npu/xdna/tiling/) and compiles the MLIR with aiecc.py. Where
something is missing it says what and how to install it, and exits 2.

    python3 mlir/build.py                      # everything, into build/xdna/
    python3 mlir/build.py --only gemm_1500     # designs whose name starts with this
    python3 mlir/build.py --gemm 256x256x256   # one more GEMM shape
    python3 mlir/build.py --dry-run            # print the commands; runs nothing

Pinned toolchain (the versions these designs were written against; nothing has been compiled or
run with them here, see mlir/README.md):
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from npu.xdna.tiling import (  # noqa: E402
    DesignError,
    GemmTiling,
    MelTiling,
    RowTiling,
    choose_gemm_tiling,
    whisper_tiny_designs,
)

MLIR_AIE_VERSION = "1.3.4"  # pip: mlir_aie (IRON + aiecc.py + bootgen), GitHub release v1.3.4
PEANO_VERSION = "21.0.0.2026062301+cb664e8c"  # pip: llvm-aie (Peano), nightly index
XRT_VERSION = "2.20.0"  # XRT with the amdxdna driver: xclbinutil to build, pyxrt to run

INSTALL = {
    "aie": (
        f"python3 -m pip install mlir_aie=={MLIR_AIE_VERSION} "
        f"-f https://github.com/Xilinx/mlir-aie/releases/expanded_assets/v{MLIR_AIE_VERSION}"
    ),
    "aiecc.py": "comes with the mlir_aie wheel (see aie); put the environment's bin/ on PATH",
    "peano": (
        f"python3 -m pip install llvm-aie=={PEANO_VERSION} "
        "-f https://github.com/Xilinx/llvm-aie/releases/expanded_assets/nightly, then "
        'export PEANO_INSTALL_DIR="$(python3 -m pip show llvm-aie | sed -n "s/^Location: //p")/llvm-aie"'
    ),
    "xclbinutil": (
        f"install XRT {XRT_VERSION} (github.com/amd/xdna-driver builds it) and `source /opt/xilinx/xrt/setup.sh`"
    ),
}
__doc__ += "".join(
    f"\n    {name:<9} {version}"
    for name, version in (("mlir_aie", MLIR_AIE_VERSION), ("llvm-aie", PEANO_VERSION), ("XRT", XRT_VERSION))
)

KERNEL_FLAGS = [
    "-O2",
    "-std=c++20",
    "--target=aie2-none-unknown-elf",
    "-ffp-contract=off",  # the kernels' float sums must match the golden models bit for bit
    "-DNDEBUG",
    "-Wno-parentheses",
    "-Wno-attributes",
    "-Wno-macro-redefined",
    "-Wno-empty-body",
    "-Wno-missing-template-arg-list-after-template-kw",
]
AIECC_FLAGS = [
    "--aie-generate-xclbin",
    "--aie-generate-npu-insts",
    "--no-compile-host",
    "--no-xchesscc",
    "--no-xbridge",
    "--xclbin-name=final.xclbin",
    "--npu-insts-name=insts.bin",
]
XCLBIN_KERNEL = "MLIR_AIE"  # aiecc's default kernel name inside each xclbin

PROBE = r"""
import importlib.metadata as md, json, pathlib
import aie.iron
try:
    from aie.utils.config import root_path
    root = str(root_path())
except Exception:
    import aie
    root = str(pathlib.Path(aie.__file__).resolve().parents[2])
try:
    version = md.version("mlir_aie")
except md.PackageNotFoundError:
    version = "unknown"
print(json.dumps({"version": version, "root": root}))
"""


@dataclass
class Toolchain:
    """What was found on this machine, and what is missing (name -> why)."""

    python: str
    aie_version: str | None = None
    aie_root: str | None = None
    aiecc: str | None = None
    peano: str | None = None
    peano_version: str | None = None
    xclbinutil: str | None = None
    xrt_version: str | None = None
    missing: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "pinned": {"mlir_aie": MLIR_AIE_VERSION, "llvm-aie": PEANO_VERSION, "xrt": XRT_VERSION},
            "found": {
                "mlir_aie": self.aie_version,
                "llvm-aie": self.peano_version,
                "xrt": self.xrt_version,
                "aiecc": self.aiecc,
                "peano_install_dir": self.peano,
                "python": self.python,
            },
        }


def _first_line(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def probe(python: str) -> Toolchain:
    """Look for every tool the build needs, without running any of them for real."""
    tc = Toolchain(python=python)
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            info = json.loads(out.stdout.strip().splitlines()[-1])
            tc.aie_version, tc.aie_root = info["version"], info["root"]
        else:
            err = (out.stderr.strip().splitlines() or ["import failed"])[-1]
            tc.missing["aie"] = f"the mlir-aie IRON Python package is not importable by {python} ({err})"
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        tc.missing["aie"] = f"could not run {python} to look for the aie package ({e})"

    tc.aiecc = shutil.which("aiecc.py") or shutil.which("aiecc")
    if not tc.aiecc:
        tc.missing["aiecc.py"] = "aiecc.py (the mlir-aie compiler driver) is not on PATH"

    peano = os.environ.get("PEANO_INSTALL_DIR")
    if not peano:
        tc.missing["peano"] = "PEANO_INSTALL_DIR is not set (Peano/llvm-aie, the AIE2 C++ compiler)"
    elif not (Path(peano) / "bin" / "clang++").exists():
        tc.missing["peano"] = f"PEANO_INSTALL_DIR={peano} has no bin/clang++ (Peano/llvm-aie)"
    else:
        tc.peano = peano
        tc.peano_version = _first_line([str(Path(peano) / "bin" / "clang++"), "--version"])

    tc.xclbinutil = shutil.which("xclbinutil")
    if not tc.xclbinutil:
        tc.missing["xclbinutil"] = "xclbinutil (XRT; aiecc.py packs the xclbin with it) is not on PATH"
    else:
        tc.xrt_version = _first_line([tc.xclbinutil, "--version"])
    return tc


@dataclass
class Step:
    """One command: argv run in cwd, stdout to a file if given."""

    argv: list[str]
    cwd: Path | None = None
    stdout: Path | None = None

    def shell(self) -> str:
        # placeholders of missing tools stay expandable: "$PEANO_INSTALL_DIR/bin/clang++"
        line = " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in self.argv)
        if self.stdout is not None:
            line += f" > {shlex.quote(str(self.stdout))}"
        if self.cwd is not None:
            line = f"(cd {shlex.quote(str(self.cwd))} && {line})"
        return line


def design_args(design: str, tiling: object) -> list[str]:
    """The command line that makes ``mlir/<design>.py`` rebuild exactly this tiling."""
    if isinstance(tiling, GemmTiling):
        t = tiling
        return ["-M", str(t.M), "-K", str(t.K), "-N", str(t.N), "-m", str(t.m), "-k", str(t.k), "-n", str(t.n)]
    if isinstance(tiling, MelTiling):
        return ["--frames", str(tiling.F), "-m", str(tiling.dft.m), "-n", str(tiling.dft.n)]
    if isinstance(tiling, RowTiling):
        args = ["--op", tiling.op] if design == "requant" else []
        args += ["-M", str(tiling.M), "-N", str(tiling.N), "--rpt", str(tiling.rpt)]
        args += ["--masked"] if tiling.masked else []
        args += ["--residual"] if tiling.residual else []
        return args
    raise TypeError(f"not a tiling: {tiling!r}")


def kernel_objects(tiling: object) -> list[str]:
    if isinstance(tiling, GemmTiling):
        return [tiling.kernel_object]
    if isinstance(tiling, MelTiling):
        return sorted({tiling.dft.kernel_object, tiling.log.layout().object_file})
    if isinstance(tiling, RowTiling):
        return [tiling.layout().object_file]
    raise TypeError(f"not a tiling: {tiling!r}")


def kernel_names(tiling: object) -> list[str]:
    if isinstance(tiling, GemmTiling):
        return ([] if not tiling.accumulate else ["zero_i32"]) + [tiling.kernel]
    if isinstance(tiling, MelTiling):
        return [tiling.dft.kernel, tiling.log.layout().kernel]
    if isinstance(tiling, RowTiling):
        return [tiling.layout().kernel]
    raise TypeError(f"not a tiling: {tiling!r}")


def plan(designs: list, out: Path, tc: Toolchain) -> tuple[list[Step], list[dict]]:
    """The commands, and the manifest entries they produce."""
    peano = tc.peano or "$PEANO_INSTALL_DIR"
    include = f"{tc.aie_root}/include" if tc.aie_root else "$MLIR_AIE_DIR/include"
    aiecc = tc.aiecc or "aiecc.py"
    steps: list[Step] = []
    objects = sorted({o for _, _, t in designs for o in kernel_objects(t)})
    kdir = out / "kernels"
    steps.append(Step(["mkdir", "-p", str(kdir)]))
    for obj in objects:
        src = ROOT / "kernels" / obj.replace(".o", ".cc")
        cmd = [f"{peano}/bin/clang++", *KERNEL_FLAGS, f"-I{include}", f"-I{ROOT / 'kernels'}"]
        steps.append(Step([*cmd, "-c", str(src), "-o", str(kdir / obj)]))
    entries = []
    for name, design, tiling in designs:
        ddir = out / name
        steps.append(Step(["mkdir", "-p", str(ddir)]))
        for obj in kernel_objects(tiling):
            steps.append(Step(["cp", str(kdir / obj), str(ddir / obj)]))
        script = ROOT / "mlir" / f"{design}.py"
        steps.append(Step([tc.python, str(script), *design_args(design, tiling)], stdout=ddir / "aie.mlir"))
        steps.append(Step([aiecc, *AIECC_FLAGS, "--peano", peano, "aie.mlir"], cwd=ddir))
        entries.append(
            {
                "name": name,
                "design": f"mlir/{design}.py",
                "design_args": design_args(design, tiling),
                "kernels": kernel_names(tiling),
                "kernel_objects": kernel_objects(tiling),
                "xclbin_kernel": XCLBIN_KERNEL,
                "tiling": tiling.to_dict(),
                "mlir": f"{name}/aie.mlir",
                "xclbin": f"{name}/final.xclbin",
                "insts": f"{name}/insts.bin",
            }
        )
    return steps, entries


def select(only: list[str], gemms: list[str], frames: int, decode_rows: int) -> list:
    designs = whisper_tiny_designs(frames, decode_rows)
    if only:
        designs = [d for d in designs if any(d[0].startswith(p) for p in only)]
    for shape in gemms:
        M, K, N = (int(x) for x in shape.lower().split("x"))
        designs.append((f"gemm_{M}x{K}x{N}", "gemm", choose_gemm_tiling(M, K, N)))
    return designs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "xdna", help="artifacts folder (default build/xdna)")
    ap.add_argument(
        "--only", action="append", default=[], help="build designs whose name starts with this (repeatable)"
    )
    ap.add_argument("--gemm", action="append", default=[], metavar="MxKxN", help="also build this GEMM shape")
    ap.add_argument("--frames", type=int, default=1500, help="encoder positions of the shapes (default 1500)")
    ap.add_argument("--decode-rows", type=int, default=5, help="rows of a decoder step (default 5)")
    ap.add_argument("--python", default=sys.executable, help="the Python that has the aie package")
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = ap.parse_args(argv)

    try:
        designs = select(args.only, args.gemm, args.frames, args.decode_rows)
    except (DesignError, ValueError) as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    if not designs:
        print(f"build.py: no design matches {args.only}", file=sys.stderr)
        return 1
    out = args.out.resolve()
    tc = probe(args.python)
    steps, entries = plan(designs, out, tc)

    if args.dry_run:
        for step in steps:
            print(step.shell())
        print(f"# then write {out / 'manifest.json'} ({len(entries)} designs)")
        for what, why in tc.missing.items():
            print(f"# missing {what}: {why}; {INSTALL[what]}")
        return 0

    if tc.missing:
        print("build.py: cannot build the npu1 artifacts, the AIE toolchain is incomplete:", file=sys.stderr)
        for what, why in tc.missing.items():
            print(f"  missing {what}: {why}\n    install: {INSTALL[what]}", file=sys.stderr)
        print("  (mlir/README.md lists the pinned versions; --dry-run shows the commands)", file=sys.stderr)
        return 2

    env = {**os.environ, "PEANO_INSTALL_DIR": tc.peano or ""}
    for step in steps:
        print(step.shell(), flush=True)
        stdout = open(step.stdout, "w") if step.stdout else subprocess.PIPE  # noqa: SIM115
        try:
            done = subprocess.run(step.argv, cwd=step.cwd, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as e:
            print(f"build.py: cannot run {step.argv[0]}: {e}", file=sys.stderr)
            return 1
        finally:
            if step.stdout:
                stdout.close()
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-30:])
            print(f"build.py: failed ({done.returncode}): {step.shell()}\n{tail}", file=sys.stderr)
            return 1
    for entry in entries:
        for key in ("xclbin", "insts"):
            if not (out / entry[key]).exists():
                print(f"build.py: aiecc.py did not produce {out / entry[key]}", file=sys.stderr)
                return 1
    manifest = {"schema": 1, "device": "npu1", "toolchain": tc.describe(), "designs": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(entries)} designs and {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
