"""The machine's convolution throughput: one large 3x3 convolution, stride 1, 'same' padding, float32.

  /work/venv/bin/python benchmarks/cases/conv_peak.py --case=conv --side=ours         # TF, NHWC
  /work/peer_torch/bin/python benchmarks/cases/conv_peak.py --case=conv --side=torchvision   # torch, NCHW

The reference for the model's effective GFLOP/s (issue 5: the whole inference pass should reach >= 85% of
this). Input [1, S, S, C] -> C channels (default S = 256, C = 256: 2*S*S*C*C*9 = 77.3 GFLOPs, the size of
FPN's P2 output conv and the RPN conv on P2 at 1024x1024). Random input and kernel (values do not affect
speed). --side=ours runs TensorFlow (`tf.nn.conv2d` in a `tf.function`, what Keras Conv2D calls);
--side=torchvision runs `torch.nn.functional.conv2d` under inference_mode, torch's native NCHW layout.
Each side imports only its own framework. metric gflop_per_s = FLOPs / median seconds of --repeats calls
(default 5) after one warm-up call (first_s).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as harness  # noqa: E402

KERNEL = 3


def tf_conv(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from maskrcnn_tf import host_allocator

    host_allocator.configure()  # before TF allocates, as every program of ours does
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    s, c = args.conv_size, args.channels
    x = tf.random.normal([1, s, s, c])  # NHWC
    kernel = tf.random.normal([KERNEL, KERNEL, c, c]) * 0.05  # [kh, kw, Cin, Cout]
    conv = tf.function(lambda inp: tf.nn.conv2d(inp, kernel, strides=1, padding="SAME"))

    def run():
        return conv(x).numpy().shape  # .numpy() waits for the result

    first, runs, shape = harness.time_calls(run, args.repeats)
    return first, runs, {"tensorflow": tf.__version__}, "NHWC", list(shape)


def torch_conv(args):
    import torch

    torch.set_num_threads(args.threads)
    s, c = args.conv_size, args.channels
    x = torch.randn(1, c, s, s)  # NCHW
    weight = torch.randn(c, c, KERNEL, KERNEL) * 0.05  # [Cout, Cin, kh, kw]

    def run():
        with torch.inference_mode():
            return tuple(torch.nn.functional.conv2d(x, weight, padding=KERNEL // 2).shape)

    first, runs, shape = harness.time_calls(run, args.repeats)
    return first, runs, {"torch": torch.__version__}, "NCHW", list(shape)


def main():
    harness.claim_stdout()
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("ours", "torchvision"), default="ours")
    parser.add_argument("--conv_size", type=int, default=256, help="spatial size S of the input")
    parser.add_argument("--channels", type=int, default=256, help="input and output channels C")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 5
    first, runs, versions, layout, shape = (tf_conv if args.side == "ours" else torch_conv)(args)
    gflops = 2.0 * args.conv_size**2 * args.channels**2 * KERNEL**2 / 1e9
    rec = harness.record(args.case, args.side, "gflop_per_s", [gflops / r for r in runs], first, versions,
                         gflops=round(gflops, 3), seconds=[round(r, 4) for r in runs], layout=layout,
                         input_size=args.conv_size, channels=args.channels, output_shape=shape,
                         intra_threads=args.threads)
    rec["value"] = round(rec["value"], 2)
    rec["runs"] = [round(r, 2) for r in rec["runs"]]
    harness.emit(rec)


if __name__ == "__main__":
    main()
