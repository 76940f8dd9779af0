"""A model that travels: a medseg checkpoint as one ONNX file, preprocessing included.

    python export.py --checkpoint best_unet.pth --output model.onnx [--opset 17]

writes the U-Net (BatchNorm folded into the convolutions, float32, NCHW for 2D / NCDHW for 3D, dynamic batch
and spatial sizes) and everything a reader needs to use it in the ONNX ``metadata_props``. Every key starts with
``medseg.`` and every value is JSON:

    medseg.format            "medseg-onnx/1"
    medseg.model_args        the U-Net's constructor arguments (``model.UNetArgs``: dim, channels, classes, pool)
    medseg.preprocessing     how raw arrays become network input (``preprocess.Preprocessing``)
    medseg.class_names       one name per foreground class
    medseg.io                input / output names, layout, which axes are dynamic, sigmoid or softmax
    medseg.export            opset, exporter, torch version, source checkpoint name
    medseg.checkpoint_format the source checkpoint's format ("medseg-unet/1")
    medseg.<key>             every other plain field of the checkpoint: postprocessing, config, metrics, epoch,
                             test_metrics, torch_version, ... (not its weights, not the resume state)

Input ``image``: the preprocessed planes (``preprocess.to_planes``), float32. Output ``logits``: one channel and a
sigmoid for a single class, else ``n_classes + 1`` channels and a softmax (background first).

Loading (:func:`load_onnx`) gives an :class:`OnnxNet` -- a ``torch.nn.Module`` running an onnxruntime CPU
session, so ``inference.predict_planes`` runs it unchanged -- and an info dict shaped like a checkpoint without
weights (``checkpoint.preprocessing_of(info, path)`` works on it). onnxruntime is optional at run time; exporting
needs ``onnx``. Nothing runs at import.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from checkpoint import CHECKPOINT_FORMAT, schema_problem, load_checkpoint, preprocessing_of
from errors import CheckpointError, ConfigError, InputError, MedSegError, oneline
from fileio import GiB, atomic_write, file_problem, format_bytes, json_safe, open_regular, printable, resolve_inside
from model import UNet, UNetArgs, check_input, fold_batchnorm, pool_factors

ONNX_FORMAT = "medseg-onnx/1"
PREFIX = "medseg."
DEFAULT_OPSET = 17             # Resize / Pad with dynamic sizes need >= 11; 17 runs on onnxruntime >= 1.11
MIN_OPSET, MAX_OPSET = 11, 20  # 20: the highest opset of torch's TorchScript exporter
MAX_ONNX_BYTES = 2 * GiB       # protobuf cannot hold more; weights + external data together are bounded by it
INPUT_NAME, OUTPUT_NAME = "image", "logits"
#: checkpoint keys that never travel: the weights go into the graph, the resume state is training's own
NOT_CARRIED = ("state_dict", "resume", "format")
#: onnxruntime reads this external-data "location" as a raw memory address: never from a file
_ORT_MEMORY_MARKER = "_ORT_MEM_ADDR_"


# ============================================================================================ export
class _TraceableUNet(nn.Module):
    """``UNet.forward`` with the odd-size padding made unconditional (a zero pad is a no-op), so that the
    TorchScript tracer records it as shape arithmetic instead of baking in the example's ``if`` branch."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x1 = n.inc(x)
        x2 = n.down1(x1)
        x3 = n.down2(x2)
        x4 = n.down3(x3)
        x5 = n.down4(x4)
        x = _up(n.up1, x5, x4)
        x = _up(n.up2, x, x3)
        x = _up(n.up3, x, x2)
        x = _up(n.up4, x, x1)
        return n.outc(x)


def _up(up: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """``model.Up.forward`` without its ``if``: pad the up-sampled map to the skip connection's size."""
    x1 = up.up(x1)
    pads: list = []
    for axis in range(x2.dim() - 1, 1, -1):  # F.pad lists the last axis first
        m = x2.shape[axis] - x1.shape[axis]
        pads += [m // 2, m - m // 2]
    return up.conv(torch.cat([x2, F.pad(x1, pads)], dim=1))


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("exporting or reading an ONNX model needs onnx: pip install onnx") from None
    return onnx


def _example_input(args: UNetArgs) -> torch.Tensor:
    """An odd-sized input (2 x the minimum + 1 per axis), so the padding of every up-sampling step is traced."""
    factors = pool_factors(args.dim, args.pool)
    size = [2 * math.prod(p[a] for p in factors) + 1 for a in range(args.dim)]
    return torch.rand(1, args.n_channels, *size, generator=torch.Generator().manual_seed(0))


def _io_record(args: UNetArgs) -> dict:
    axes = ["batch", "channels"] + (["depth"] if args.dim == 3 else []) + ["height", "width"]
    return {"input": INPUT_NAME, "output": OUTPUT_NAME, "dtype": "float32", "layout": "NCHW" if args.dim == 2 else "NCDHW",
            "axes": axes, "dynamic": [a for a in axes if a != "channels"], "input_channels": args.n_channels,
            "output_channels": args.n_classes, "activation": "sigmoid" if args.n_classes == 1 else "softmax"}


def export_model(model: UNet, path: str | os.PathLike, info: dict | None = None, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` (a medseg :class:`model.UNet`, BatchNorm folded here, float32) to ``path`` as ONNX with
    dynamic batch and spatial sizes, atomically. ``info``: checkpoint fields to carry in the metadata (see the
    module docstring; weights, resume state and tensors are dropped; ``source`` becomes ``export.checkpoint``;
    ``model_args`` and the format tag are always written). Returns the path.

    Raises ConfigError for an opset outside 11..20 or a missing ``onnx`` package; RuntimeError when the traced
    graph would not reproduce the model (a ``UNet.forward`` this exporter does not know).
    """
    if not isinstance(model, UNet):
        raise TypeError(f"export_model exports a model.UNet, got {type(model).__name__}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset {opset!r}: expected an integer in {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
    onnx = _require_onnx()
    net = fold_batchnorm(model).to("cpu", torch.float32).to(memory_format=torch.contiguous_format).eval()
    args = net.args
    traceable = _TraceableUNet(net).eval()
    example = _example_input(args)
    with torch.inference_mode():
        want, got = net(example), traceable(example)
    if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * max(1.0, float(want.abs().max())):
        raise RuntimeError("export.py's traceable U-Net no longer matches model.UNet.forward; update _TraceableUNet")
    spatial = ["depth", "height", "width"][3 - args.dim:]
    dynamic = {0: "batch", **{2 + i: name for i, name in enumerate(spatial)}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer chatter
        torch.onnx.export(traceable, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic})
    proto = onnx.load_model_from_string(buf.getvalue())
    carried = {k: v for k, v in (info or {}).items() if k not in NOT_CARRIED and not _holds_tensor(v)}
    source = carried.pop("source", None)
    prep = carried.get("preprocessing")
    meta = {"format": ONNX_FORMAT, **({"checkpoint_format": info["format"]} if info and "format" in info else {}),
            "model_args": asdict(args), **({"class_names": prep.get("class_names")} if isinstance(prep, dict) else {}),
            "io": _io_record(args),
            "export": {"opset": opset, "exporter": "torch.onnx TorchScript (dynamo=False)",
                       "torch_version": str(torch.__version__), "batchnorm_folded": True,
                       **({"checkpoint": source} if source else {})}}
    meta.update({k: v for k, v in carried.items() if k not in meta})
    onnx.helper.set_model_props(proto, {PREFIX + k: json.dumps(json_safe(v), ensure_ascii=False, allow_nan=False)
                                        for k, v in meta.items()})
    activation = "sigmoid" if args.n_classes == 1 else "softmax over the channels"
    proto.doc_string = (f"medseg {args.dim}D U-Net: input '{INPUT_NAME}' float32 (N, {args.n_channels}, "
                        f"{'D, ' if args.dim == 3 else ''}H, W) preprocessed as medseg.preprocessing says; output "
                        f"'{OUTPUT_NAME}' (N, {args.n_classes}, ...) logits, {activation}. Metadata: medseg.* (JSON).")
    data = proto.SerializeToString()
    return atomic_write(Path(path), ".tmp", lambda tmp: Path(tmp).write_bytes(data))


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensor(x) for x in v)
    return False


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike,
                      opset: int = DEFAULT_OPSET) -> tuple[Path, list[str]]:
    """Export a checkpoint file (refused exactly as ``checkpoint.load_checkpoint`` refuses it) to ``output``
    (a ``.onnx`` name, not the checkpoint itself). Returns (path, warnings); a checkpoint without a preprocessing
    record gets the default ``checkpoint.preprocessing_of`` assumes, written out, and that warning."""
    checkpoint, output = Path(checkpoint), Path(output)
    if output.suffix.lower() != ".onnx":
        raise ConfigError(f"--output {output}: expected a file name ending in .onnx")
    model, ckpt = load_checkpoint(checkpoint, "cpu")
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise ConfigError(f"--output {output}: is the checkpoint itself (expected a new .onnx file)")
    prep, notes = preprocessing_of(ckpt, checkpoint)
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    info.update(preprocessing=prep.to_dict(), source=checkpoint.name)
    return export_model(model, output, info, opset), notes


# =========================================================================================== loading
def is_onnx(path: str | os.PathLike) -> bool:
    """True when ``path`` names an ``.onnx`` file (by its suffix; nothing is opened): dispatch on it before
    ``checkpoint.load_checkpoint``."""
    return Path(path).suffix.lower() == ".onnx"


def _require_ort(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"{path}: running an ONNX model needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def _read_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes, at most ``limit`` (refused beyond), read through a descriptor checked to be a regular file."""
    problem = file_problem(path)
    if problem == "no such file or folder":
        raise CheckpointError(f"{path}: ONNX model not found (write one with `python export.py --checkpoint "
                              f"best_unet.pth --output {path.name}`)")
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        fd = open_regular(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}; expected an .onnx file)") from None
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{path}: is {format_bytes(size)}, more than the {format_bytes(limit)} an ONNX "
                                  f"model may have (protobuf's limit; expected a medseg U-Net)")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: grew beyond {format_bytes(limit)} while being read (expected a medseg U-Net)")
    return data


def _all_tensors(graph: Any) -> list:
    """Every TensorProto of a graph: initializers, sparse initializers, node attributes, subgraphs."""
    out = list(graph.initializer)
    for sp in graph.sparse_initializer:
        out += [sp.values, sp.indices]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                out.append(attr.t)
            out += list(attr.tensors)
            if attr.HasField("g"):
                out += _all_tensors(attr.g)
            for g in attr.graphs:
                out += _all_tensors(g)
    return out


def _inline_external_data(proto: Any, path: Path, budget: int) -> None:
    """Read every tensor kept in an external data file into the model, after checking that the file lies beside
    ``path`` (``fileio.resolve_inside``: no absolute names, no ``..``, no symlinks out), is a regular file and
    holds the bytes named. onnxruntime then never resolves a file name itself."""
    from onnx import TensorProto

    for t in _all_tensors(proto.graph):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        location = entries.get("location", "")
        shown = printable(location)
        if _ORT_MEMORY_MARKER in location:
            raise CheckpointError(f"{path}: tensor '{printable(t.name)}' names the external data '{shown}', "
                                  "onnxruntime's in-memory marker (expected a data file beside the model)")
        try:
            target = resolve_inside(path.parent, location, path)
        except InputError as exc:
            raise CheckpointError(str(exc)) from None
        problem = file_problem(target)
        if problem:
            what = "does not exist" if problem == "no such file or folder" else problem
            raise CheckpointError(f"{path}: tensor '{printable(t.name)}' names the external data file '{shown}', "
                                  f"which {what} (expected it beside the model, in {path.parent.name or '.'}/)")
        try:
            offset = int(entries.get("offset", 0))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise CheckpointError(f"{path}: tensor '{printable(t.name)}' has a non-integer external data offset "
                                  "or length (expected a file written by onnx)") from None
        try:
            fd = open_regular(target)
        except OSError as exc:
            raise CheckpointError(f"{path}: external data file '{shown}' cannot be read ({exc.strerror or exc}; "
                                  "expected a regular file beside the model)") from None
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            length = size - offset if length is None else length
            if offset < 0 or length < 0 or offset + length > size:
                raise CheckpointError(f"{path}: tensor '{printable(t.name)}' wants bytes {offset}..{offset + length} "
                                      f"of '{shown}', which holds {size} (expected an intact model)")
            budget -= length
            if budget < 0:
                raise CheckpointError(f"{path}: model and external data exceed {format_bytes(MAX_ONNX_BYTES)} "
                                      "(expected a medseg U-Net)")
            fh.seek(offset)
            t.raw_data = fh.read(length)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT


def _decode_info(proto: Any, path: Path) -> dict:
    """The checked ``medseg.*`` metadata as a checkpoint-like dict."""
    props = {p.key: p.value for p in proto.metadata_props}
    if PREFIX + "format" not in props:
        raise CheckpointError(f"{path}: not a medseg ONNX model: no medseg metadata, expected a file written by "
                              "export.py")
    info: dict = {}
    for key, text in props.items():
        if not key.startswith(PREFIX):
            continue
        try:
            info[key[len(PREFIX):]] = json.loads(text)
        except ValueError:
            raise CheckpointError(f"{path}: metadata {printable(key)} is not JSON (expected a file written by "
                                  "export.py)") from None
    if info["format"] != ONNX_FORMAT:
        raise CheckpointError(f"{path}: medseg ONNX format {printable(str(info['format']))[:40]!r}, expected "
                              f"{ONNX_FORMAT!r} (written by another version of export.py)")
    for key in ("config", "metrics", "preprocessing", "postprocessing"):
        if key in info and not isinstance(info[key], dict):
            raise CheckpointError(f"{path}: metadata medseg.{key} is a {type(info[key]).__name__}, expected a dict")
    problem = schema_problem({**info, "format": CHECKPOINT_FORMAT, "state_dict": {}})
    if problem:
        raise CheckpointError(f"{path}: not a usable medseg ONNX model: {problem}")
    if "preprocessing" in info:
        preprocessing_of(info, path)  # an unusable record is refused now, as load_checkpoint does
    args = UNetArgs(**info["model_args"])
    graph = proto.graph
    initialized = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialized]
    want_in, want_out = (args.n_channels, args.n_classes)
    got = [[d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
           for v in (inputs[:1] + list(graph.output[:1]))]
    if (len(inputs) != 1 or len(graph.output) != 1 or any(len(s) != args.dim + 2 for s in got)
            or got[0][1] != want_in or got[1][1] != want_out):
        raise CheckpointError(f"{path}: the graph's inputs / outputs {got} do not match its medseg.model_args "
                              f"({want_in} -> {want_out} channels, {args.dim}D; expected a file written by export.py)")
    return info


def _parse(data: bytes, path: Path) -> Any:
    onnx = _require_onnx()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends, in versions that differ
        raise CheckpointError(f"{path}: not an ONNX model (the file is corrupt or of another kind: "
                              f"{type(exc).__name__}; expected an .onnx file written by export.py)") from None
    if proto.ir_version <= 0 or not proto.graph.node:
        raise CheckpointError(f"{path}: not an ONNX model (no graph; expected an .onnx file written by export.py)")
    return proto


def read_onnx_info(path: str | os.PathLike) -> dict:
    """The checked medseg metadata of an ONNX file as a checkpoint-like dict (needs ``onnx``, not onnxruntime)."""
    path = Path(path)
    return _decode_info(_parse(_read_bytes(path, MAX_ONNX_BYTES), path), path)


def _session_options(ort: Any, threads: int) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    # no busy-waiting worker threads: they would keep a core spinning after every run and slow down torch
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def _load(path: Path, threads: int, need_medseg: bool) -> tuple[Any, dict, int]:
    ort = _require_ort(path)
    data = _read_bytes(path, MAX_ONNX_BYTES)
    proto = _parse(data, path)
    info = _decode_info(proto, path) if need_medseg else {}
    n_params = sum(math.prod(t.dims) for t in proto.graph.initializer if t.data_type == 1)  # float32 weights
    if any(t.data_location == t.EXTERNAL for t in _all_tensors(proto.graph)):
        _inline_external_data(proto, path, MAX_ONNX_BYTES - len(data))
        data = proto.SerializeToString()
    try:  # from bytes: onnxruntime opens no file of its own
        session = ort.InferenceSession(data, _session_options(ort, threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({oneline(exc, 200)}; expected an .onnx file "
                              "written by export.py)") from None
    return session, info, n_params


def create_session(path: str | os.PathLike, threads: int = 0) -> Any:
    """An onnxruntime CPU ``InferenceSession`` of any ONNX file (medseg metadata not required), with the same
    checks as :func:`load_onnx`: size bound, external data only beside the file. ``threads`` 0 = torch's count."""
    return _load(Path(path), threads, need_medseg=False)[0]


class OnnxNet(nn.Module):
    """An onnxruntime session as a ``torch.nn.Module``: ``forward(x)`` runs it on the CPU in float32 and returns
    float32 logits on ``x``'s device. ``args`` (a :class:`model.UNetArgs`) and ``min_size`` as on ``UNet``; it
    has no parameters (``n_parameters`` counts the graph's weights). Autocast / bf16 do not apply."""

    def __init__(self, session: Any, args: UNetArgs, path: str | os.PathLike | None = None):
        super().__init__()
        self.session, self.args, self.path = session, args, None if path is None else str(path)
        self.input_name = session.get_inputs()[0].name
        factors = pool_factors(args.dim, args.pool)
        self.min_size = tuple(math.prod(p[a] for p in factors) for a in range(args.dim))
        self.n_parameters = 0

    @property
    def model_args(self) -> dict:
        return asdict(self.args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.args, self.min_size)
        a = x.detach().to("cpu", torch.float32).contiguous().numpy()  # channels_last -> NCHW
        out = self.session.run(None, {self.input_name: a})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)

    def extra_repr(self) -> str:
        return f"{self.path or 'in memory'}, {self.args}"


def load_onnx(path: str | os.PathLike, threads: int = 0) -> tuple[OnnxNet, dict]:
    """Load an ONNX file written by :func:`export_model`: ``(OnnxNet, info)``; ``info`` holds the checkpoint's
    fields (``format`` = "medseg-onnx/1", ``model_args``, ``preprocessing``, ``postprocessing``, ``config``,
    ``metrics``, ``epoch``, ``test_metrics``, ...) plus ``class_names``, ``io``, ``export``, ``checkpoint_format``.

    ``threads``: onnxruntime's intra-op threads (0 = ``torch.get_num_threads()``). Raises ConfigError without
    onnxruntime / onnx, CheckpointError (one line naming the file) for a missing, oversized, foreign or corrupt
    file, one without medseg metadata, or external data that is missing or not beside the file.
    """
    path = Path(path)
    session, info, n_params = _load(path, threads, need_medseg=True)
    net = OnnxNet(session, UNetArgs(**info["model_args"]), path)
    net.n_parameters = n_params
    return net.eval(), info


# =============================================================================================== CLI
def verify(path: str | os.PathLike, model: UNet, threads: int = 0) -> float:
    """Max |logit difference| between onnxruntime on ``path`` and ``model`` (eval, fp32) on an odd-sized input."""
    net, _ = load_onnx(path, threads)
    x = _example_input(model.args)
    with torch.inference_mode():
        return float((net(x) - model.eval().float()(x)).abs().max())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description="Export a medseg checkpoint to ONNX, with its "
                                "preprocessing, classes and training record in the ONNX metadata (medseg.*).")
    p.add_argument("--checkpoint", default="best_unet.pth", help="checkpoint written by run.py (default: %(default)s)")
    p.add_argument("--output", default=None, help="the .onnx file to write (default: the checkpoint's name with "
                   ".onnx, beside it)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: %(default)s)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip running the exported file in onnxruntime against PyTorch (default: verify when "
                        "onnxruntime is installed)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 written, 1 export failed, 2 usage error / unusable checkpoint)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    output = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".onnx")
    t0 = time.perf_counter()
    try:
        path, notes = export_checkpoint(args.checkpoint, output, args.opset)
    except MedSegError as exc:
        print(f"export.py: error: {oneline(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the exporter itself failed: one line, exit 1
        print(f"export.py: error: export failed ({oneline(exc, 240)})", file=sys.stderr)
        return 1
    for note in notes:
        print(f"export.py: warning: {note}", file=sys.stderr)
    line = f"wrote {path} ({format_bytes(path.stat().st_size)}, opset {args.opset}, {time.perf_counter() - t0:.1f} s)"
    if args.verify:
        try:
            model, _ = load_checkpoint(args.checkpoint, "cpu")
            line += f"; onnxruntime agrees with PyTorch to {verify(path, model):.1e} (max |logit difference|)"
        except ConfigError:
            line += "; not verified (pip install onnxruntime to check it)"
        except MedSegError as exc:
            print(f"export.py: error: the written file does not load: {oneline(exc)}", file=sys.stderr)
            return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
