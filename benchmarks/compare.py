"""Side-by-side speed and memory: maskrcnn_tf against torchvision and TF Model Garden, in one invocation.

  python benchmarks/compare.py [--cases=infer,train,conv | all] [--peers=torchvision,modelgarden]
      [--image_size=1024] [--repeats=N] [--roi_align_backend=gather] [--jit_compile]
      [--torch_python=/work/peer_torch/bin/python] [--mg_python=/work/peer_mg/bin/python]
      [--data_flags="..."] [--mg_box_head=2fc|experiment]

Every case runs as its own subprocess, with its side's python, from a case script (benchmarks/cases/,
interface in benchmarks/cases/_harness.py): ours first, then each peer, case after case, so peak RSS is
per case and ours and the peer see the machine in the same state. Output, JSON lines on stdout:
  1. one `meta` line (git commit of the tree measured, CPU count, load average, pythons);
  2. each case script's own line as it finishes (or a line with "skipped" / "error" instead);
  3. per case and peer a summary line {"case", "peer", "ours", "theirs", "metric", "ratio" (ours/theirs),
     "goal", "met", "peak_rss_mb_ours", "peak_rss_mb_theirs", "rss_met"}; for infer vs torchvision also
     "theirs_with_candidates" / "ratio_with_candidates": torchvision timed with the same 1000 NMS
     candidates as ours instead of all 1000 x 90 that the brief's score threshold 0 lets through
     (see torchvision_model.py);
  4. for `infer` with `conv` in the same run: the effective GFLOP/s of our whole pass (FLOPs counted by
     ours_model.py / median seconds) next to the single large 3x3 conv's GFLOP/s, and their ratio.
Each case line also has "process_wall_s" and "process_cpu" {"user_s", "system_s", "minor_faults"}: the
whole child process's CPU seconds and minor page faults (getrusage of the waited-for child, so they
include its start-up and model build); summary lines repeat them as "process_cpu_ours/_theirs". System
seconds and faults measure the kernel's share (memory the allocator unmapped and faults in again) and,
unlike wall time, barely move when the machine is shared.

infer_800 (not in the defaults): the same seeded random torchvision weights on both sides, one 800 x 1333
image, batch 1, each side's COCO inference settings (ours: the torchvision_maskrcnn_r50_fpn preset with
the weights imported by maskrcnn_tf.weights, canvas --ours_canvas or the preset's 1344 x 1344,
--ours_orientation_canvases for model.orientation_canvases). infer_800_v2: the same with torchvision's
maskrcnn_resnet50_fpn_v2 (BatchNorm FPN and heads, two RPN convs, 4-conv + 1-FC box head; its random
weights have random BatchNorm statistics everywhere) and, on our side, the preset the file's keys call
for, torchvision_maskrcnn_r50_fpn_v2 (named in ours' "config" field). For each of the two, compare.py
first has the torchvision script write the case's shared .pth (--write_weights) into the log directory
as <case>_torchvision_weights.pth, then runs ours, then torchvision.

train_v2 (not in the defaults): `train`'s step (batch 2, --image_size, the same instances) on torchvision's
v2 architecture trained from scratch: trainable BatchNorm everywhere (backbone nn.BatchNorm2d, FPN and
heads in train mode, batch statistics), all five stages trainable; ours runs the
torchvision_maskrcnn_r50_fpn_v2 preset with model.backbone.norm=batch_norm and freeze_at=0. Every model
case's line names its "architecture" (v1 / v2), "norms" and "bn_mode".

Cases and scripts: infer, train, train_v2 -> <side>_model.py; infer_800, infer_800_v2 -> <side>_infer_800.py;
conv -> conv_peak.py --side=<side> (ours = TF, torchvision = torch; Model Garden has no conv case, it
would measure the same TF); convert, pipeline ->
<side>_convert.py / <side>_pipeline.py (Model Garden only). A script that does not exist yet or a peer
python that is missing gives a JSON line saying so, never a crash. --image_size goes to the model cases
(infer, train, train_v2) and gpu_train, --repeats and --threads to every case but the data cases, which
get --data_flags verbatim.

Goals are issue 5's: infer ours/torchvision <= 0.75, train <= 0.8, convert images/s ours/modelgarden
>= 3, pipeline >= 1.5, peak RSS of ours <= the peer's, infer effective GFLOP/s >= 0.85 x conv GFLOP/s;
and issue 25's: infer_800 and infer_800_v2 <= 0.75, train_v2 <= 0.8 (and peak RSS <= torchvision's).
Only ratios taken in one run count: the machine is shared and noisy (each line has the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES_DIR = os.path.join(HERE, "cases")
DEFAULT_CASES = ("infer", "train", "conv")
ALL_CASES = DEFAULT_CASES + ("convert", "pipeline", "gpu_train", "infer_800", "infer_800_v2", "train_v2")
GPU_CASES = ("gpu_train",)  # NVIDIA GPUs only (ours_gpu_train.py): asked for by name, never part of 'all'

PEERS = ("torchvision", "modelgarden")
MODEL_CASES = ("infer", "train", "train_v2")
DATA_CASES = ("convert", "pipeline")
# Same imported torchvision weights on both sides (<side>_infer_800.py): v1 and v2 architectures.
INFER_800_CASES = ("infer_800", "infer_800_v2")
# Which peers have each case (conv: Model Garden runs the same TF as ours; data: torchvision has none).
CASE_PEERS = {"infer": PEERS, "train": PEERS, "conv": ("torchvision",), "convert": ("modelgarden",),
              "pipeline": ("modelgarden",), "gpu_train": (), "infer_800": ("torchvision",),
              "infer_800_v2": ("torchvision",), "train_v2": ("torchvision",)}
# (peer, case) -> (comparison, bound) on ours/theirs.
GOALS = {
    ("torchvision", "infer"): ("<=", 0.75),
    ("torchvision", "train"): ("<=", 0.8),
    ("modelgarden", "convert"): (">=", 3.0),
    ("modelgarden", "pipeline"): (">=", 1.5),
    ("torchvision", "infer_800"): ("<=", 0.75),
    ("torchvision", "infer_800_v2"): ("<=", 0.75),
    ("torchvision", "train_v2"): ("<=", 0.8),
}
CONV_EFFICIENCY_GOAL = 0.85  # infer effective GFLOP/s >= this x the large conv's GFLOP/s
ERROR_TAIL_LINES = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated subset of {','.join(ALL_CASES)}, or 'all' (every case but "
                             f"{','.join(GPU_CASES)})")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    parser.add_argument("--ours_python", default=os.environ.get("OURS_PYTHON", sys.executable))
    parser.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON", "/work/peer_torch/bin/python"))
    parser.add_argument("--mg_python", default=os.environ.get("MG_PYTHON", "/work/peer_mg/bin/python"))
    parser.add_argument("--image_size", type=int, default=None, help="model cases (default: scripts', 1024)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case (default: scripts', infer/conv 5, train 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads, all sides (default 2)")
    parser.add_argument("--roi_align_backend", default=None, help="ours: crop_and_resize | gather")
    parser.add_argument("--jit_compile", action="store_true", help="ours: XLA for the inference fn / train step")
    parser.add_argument("--mg_box_head", default=None, choices=("2fc", "experiment"),
                        help="Model Garden box head (default 2fc, as ours and torchvision)")
    parser.add_argument("--tv_candidates", type=int, default=None,
                        help="torchvision infer: NMS candidates of its second series (default 1000; 0 = off)")
    parser.add_argument("--ours_canvas", default=None,
                        help="infer_800(_v2), ours: HxW canvas (default: the preset's)")
    parser.add_argument("--ours_orientation_canvases", action="store_true",
                        help="infer_800(_v2), ours: model.orientation_canvases on")
    parser.add_argument("--data_flags", default="", help="extra flags for the convert/pipeline scripts")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case process")
    parser.add_argument("--log_dir", default=None,
                        help="where each process's stderr and the infer_800 cases' shared weights go "
                             "(default: a tmp dir)")
    args = parser.parse_args(argv)
    if args.cases == "all":
        cases = tuple(c for c in ALL_CASES if c not in GPU_CASES)
    else:
        cases = tuple(c for c in args.cases.split(",") if c)
    unknown = [c for c in cases if c not in ALL_CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; allowed: {', '.join(ALL_CASES)} or all")
    peers = tuple(p for p in args.peers.split(",") if p)
    if any(p not in PEERS for p in peers):
        parser.error(f"unknown peers in {args.peers!r}; allowed: {', '.join(PEERS)}")
    args.case_list, args.peer_list = cases, peers
    return args


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def python_of(side: str, args) -> str:
    return {"ours": args.ours_python, "torchvision": args.torch_python, "modelgarden": args.mg_python}[side]


def shared_weights(case: str, args) -> str:
    """The torchvision state dict an infer_800 case's sides share, in the log directory (one per case)."""
    return os.path.join(args.log_dir, f"{case}_torchvision_weights.pth")


def command(case: str, side: str, args):
    """(python, script path, flags) of one case on one side."""
    if case == "conv":
        script, flags = os.path.join(CASES_DIR, "conv_peak.py"), [f"--side={side}"]
    elif case in INFER_800_CASES:
        script = os.path.join(CASES_DIR, f"{side}_infer_800.py")
        flags = [f"--weights={shared_weights(case, args)}"]
        if side == "ours" and args.ours_canvas:
            flags.append(f"--canvas={args.ours_canvas}")
        if side == "ours" and args.ours_orientation_canvases:
            flags.append("--orientation_canvases")
    elif case in MODEL_CASES:
        script, flags = os.path.join(CASES_DIR, f"{side}_model.py"), []
    else:
        script, flags = os.path.join(CASES_DIR, f"{side}_{case}.py"), shlex.split(args.data_flags)
    if case not in DATA_CASES:
        if args.image_size and case not in ("conv",) + INFER_800_CASES:
            flags.append(f"--image_size={args.image_size}")
        if args.repeats:
            flags.append(f"--repeats={args.repeats}")
        if args.threads:
            flags.append(f"--threads={args.threads}")
    if case in MODEL_CASES and side == "ours":
        if args.roi_align_backend:
            flags.append(f"--roi_align_backend={args.roi_align_backend}")
        if args.jit_compile:
            flags.append("--jit_compile")
    if case == "infer" and side == "torchvision" and args.tv_candidates is not None:
        flags.append(f"--candidates={args.tv_candidates}")
    if case in MODEL_CASES and side == "modelgarden" and args.mg_box_head:
        flags.append(f"--box_head={args.mg_box_head}")
    return python_of(side, args), script, [f"--case={case}"] + flags


def child_cpu(before, after) -> dict:
    """CPU seconds and minor faults of the children waited for between two getrusage(RUSAGE_CHILDREN)
    readings: with one case process at a time, that child (and any workers it waited for)."""
    return {"user_s": round(after.ru_utime - before.ru_utime, 2),
            "system_s": round(after.ru_stime - before.ru_stime, 2),
            "minor_faults": after.ru_minflt - before.ru_minflt}


def run_case(case: str, side: str, args, log_dir: str):
    """Runs one case script; returns its JSON record (or a skipped / error record)."""
    python, script, flags = command(case, side, args)
    base = {"case": case, "side": side}
    if not os.path.exists(python):
        return dict(base, skipped=f"python not found: {python}")
    if not os.path.exists(script):
        return dict(base, skipped=f"case script does not exist yet: {os.path.relpath(script, ROOT)}")
    log_path = os.path.join(log_dir, f"{case}_{side}.stderr")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               PYTHONUNBUFFERED="1")
    print(f"[compare] {case} / {side}: {python} {os.path.relpath(script, ROOT)} {' '.join(flags)}", file=sys.stderr,
          flush=True)
    start, usage_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        try:
            result = subprocess.run([python, script] + flags, stdout=subprocess.PIPE, stderr=log, text=True,
                                    cwd=ROOT, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(base, error=f"timeout after {args.timeout:.0f} s", stderr_log=log_path)
    wall = round(time.perf_counter() - start, 1)
    process_cpu = child_cpu(usage_before, resource.getrusage(resource.RUSAGE_CHILDREN))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        with open(log_path) as log:
            tail = log.read().strip().splitlines()[-ERROR_TAIL_LINES:]
        return dict(base, error=f"exit code {result.returncode}", stderr_tail=tail, stderr_log=log_path,
                    process_cpu=process_cpu)
    record = json.loads(lines[-1])
    record["process_wall_s"] = wall
    record["process_cpu"] = process_cpu
    return record


def prepare_shared_weights(case: str, args, log_dir: str):
    """infer_800 / infer_800_v2: the torchvision script writes the case's checkpoint both sides load. None
    when done, else a skipped / error record."""
    python, script, flags = command(case, "torchvision", args)
    base = {"case": case}
    if "torchvision" not in args.peer_list:
        return dict(base, skipped=f"{case} needs the torchvision peer (it writes the shared weights)")
    if not os.path.exists(python):
        return dict(base, skipped=f"python not found: {python}")
    log_path = os.path.join(log_dir, f"{case}_write_weights.stderr")
    with open(log_path, "w") as log:
        result = subprocess.run([python, script] + flags + ["--write_weights"], stdout=subprocess.PIPE, stderr=log,
                                text=True, cwd=ROOT, timeout=args.timeout)
    if result.returncode != 0 or not os.path.exists(shared_weights(case, args)):
        return dict(base, error=f"writing the shared weights failed (exit code {result.returncode})",
                    stderr_log=log_path)
    return None


def summarize(case: str, peer: str, ours: dict, theirs: dict) -> dict:
    """The summary line of one case and peer (ratio = ours / theirs for every metric)."""
    line = {"case": case, "peer": peer}
    missing = [side for side, rec in (("ours", ours), (peer, theirs)) if "value" not in rec]
    if missing:
        return dict(line, skipped=f"no measurement from {', '.join(missing)}")
    metric = ours["metric"]
    ratio = ours["value"] / theirs["value"] if theirs["value"] else None
    goal = GOALS.get((peer, case))
    met = None
    if goal and ratio is not None:
        op, bound = goal
        met = ratio <= bound if op == "<=" else ratio >= bound
    rss_ours, rss_theirs = ours.get("peak_rss_mb"), theirs.get("peak_rss_mb")
    line.update(
        ours=ours["value"], theirs=theirs["value"], metric=metric, ratio=None if ratio is None else round(ratio, 3),
        goal=None if goal is None else f"ours/theirs {goal[0]} {goal[1]}", met=met,
        peak_rss_mb_ours=rss_ours, peak_rss_mb_theirs=rss_theirs,
        # The memory goal is the product cases'; conv only measures the machine's convolution speed.
        rss_met=None if rss_ours is None or rss_theirs is None or case == "conv" else rss_ours <= rss_theirs,
        process_cpu_ours=ours.get("process_cpu"), process_cpu_theirs=theirs.get("process_cpu"),
        load_avg_1m=[ours.get("load_avg_1m"), theirs.get("load_avg_1m")])
    # torchvision infer also reports a series with the same 1000 NMS candidates as ours (its threshold-0
    # series sends all 1000 x 90 candidates through NMS): the ratio against that one too.
    candidates = theirs.get("with_candidates")
    if candidates and candidates.get("value"):
        ratio_c = ours["value"] / candidates["value"]
        line.update(theirs_with_candidates=candidates["value"], candidates=candidates.get("candidates"),
                    ratio_with_candidates=round(ratio_c, 3),
                    met_with_candidates=None if goal is None else (ratio_c <= goal[1] if goal[0] == "<=" else
                                                                   ratio_c >= goal[1]))
    return line


def conv_efficiency(results: dict) -> dict:
    """Effective GFLOP/s of the inference pass vs the single large conv, both measured in this run."""
    line = {"case": "infer_vs_conv", "goal": f"effective / conv >= {CONV_EFFICIENCY_GOAL}"}
    ours_infer, ours_conv = results.get(("infer", "ours"), {}), results.get(("conv", "ours"), {})
    if "gflops" not in ours_infer or "value" not in ours_conv:
        return dict(line, skipped="needs ours infer (with its FLOP count) and ours conv in the same run")
    effective = ours_infer["gflops"] / ours_infer["value"]
    ratio = effective / ours_conv["value"]
    line.update(gflops=ours_infer["gflops"], infer_s=ours_infer["value"],
                effective_gflop_per_s=round(effective, 2), conv_gflop_per_s=ours_conv["value"],
                ratio=round(ratio, 3), met=ratio >= CONV_EFFICIENCY_GOAL)
    # For scale: the peers' time at our FLOP count (the same R50-FPN architecture; torchvision's 91-class
    # predictors add ~0.5%), and torch's own conv peak.
    for peer in PEERS:
        theirs = results.get(("infer", peer), {})
        if "value" in theirs:
            line[f"{peer}_infer_s"] = theirs["value"]
            line[f"{peer}_effective_gflop_per_s_at_our_flops"] = round(ours_infer["gflops"] / theirs["value"], 2)
    torch_conv = results.get(("conv", "torchvision"), {})
    if "value" in torch_conv:
        line["torch_conv_gflop_per_s"] = torch_conv["value"]
    return line


def meta(args) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "maskrcnn_tf", "benchmarks")
    return {"meta": {
        "commit": git("rev-parse", "--short", "HEAD"), "dirty_files": dirty.splitlines() if dirty else [],
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "cases": list(args.case_list), "peers": list(args.peer_list),
        "pythons": {side: python_of(side, args) for side in ("ours",) + PEERS},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }}


def main(argv=None):
    args = parse_args(argv)
    log_dir = args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="compare_")
    os.makedirs(log_dir, exist_ok=True)
    print(f"[compare] stderr of each case process goes to {log_dir}", file=sys.stderr, flush=True)
    emit(meta(args))
    results = {}
    for case in args.case_list:
        peers = [p for p in args.peer_list if p in CASE_PEERS[case]]
        if case in INFER_800_CASES:
            prepared = prepare_shared_weights(case, args, log_dir)
            if prepared is not None:  # no shared weights: neither side can run
                for side in ["ours"] + peers:
                    emit(dict(prepared, side=side))
                continue
        for side in ["ours"] + peers:
            results[(case, side)] = run_case(case, side, args, log_dir)
            emit(results[(case, side)])
        for peer in peers:
            emit(summarize(case, peer, results[(case, "ours")], results[(case, peer)]))
    if "infer" in args.case_list:
        emit(conv_efficiency(results))


if __name__ == "__main__":
    main()
