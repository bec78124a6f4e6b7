"""Drop known start-up noise that native libraries write straight to file descriptor 2, where no Python
setting reaches: TensorFlow's and its absl's lines logged before ``absl::InitializeLog`` (the oneDNN notice,
the CUDA stub's "Could not find cuda drivers", CPU-feature advice; TF_CPP_MIN_LOG_LEVEL does not silence
these since TF 2.18), and the INFO lines of the SentencePiece copy inside tensorflow-text.

``cli.common.run`` starts this file as a small child process that reads the command's stderr through a pipe
and writes everything else through unchanged. A child, not a thread: when the command crashes, the child
still passes on the crash message. ``--verbose`` does not start it.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

NOISE = re.compile(
    rb"^(?:"
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    # absl-format INFO lines (I + date): what TF_CPP_MIN_LOG_LEVEL=3 means to hide, even before absl starts
    rb"|I\d{4} [\d:.]+ +\d+ [\w.]+\.cc:\d+\] .*"
    # known TF warnings/errors that are not about this program: CUDA/cuDNN plugin registration on GPU hosts
    rb"|[WE]\d{4} [\d:.]+ +\d+ (?:cuda_dnn|cuda_fft|cuda_blas|cudart_stub|cpu_feature_guard|port)\.cc:\d+\] .*"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    rb"|\w+\.cc\(\d+\) LOG\(INFO\) .*"  # SentencePiece INFO (tensorflow-text's copy has no level setting)
    # libtpu loaded to compile for a TPU topology on a host without TPUs (meditron-aot): no metadata server,
    # so jax hands it placeholder strings; only on such hosts does the runtime name them.
    rb"|Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type.*"
    rb"|WARNING: Logging before InitGoogle\(\) is written to STDERR"
    rb"|E\d{4} [\d:.]+ +\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker hostname "
    rb"'WARNING: could not determine TPU worker hostnames.*"
    rb")\r?$"
)
# The location trace libtpu prints under an error: dropped only right after a dropped line.
TRACE = re.compile(rb"^(?:=== Source Location Trace: ===|[\w./-]+\.cc:\d+)\r?$")


def is_noise(line: bytes) -> bool:
    return NOISE.match(line) is not None


def main() -> None:
    src, out = sys.stdin.buffer.fileno(), sys.stdout.buffer
    pending = b""
    dropping = False  # the previous line was dropped
    while True:
        # A line that stays incomplete (a progress bar, a prompt) goes out after a short wait.
        ready, _, _ = select.select([src], [], [], 0.2 if pending else None)
        if not ready:
            out.write(pending)
            out.flush()
            pending = b""
            continue
        chunk = os.read(src, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            dropping = is_noise(line) or (dropping and TRACE.match(line) is not None)
            if not dropping:
                out.write(line + b"\n")
        out.flush()
    if pending and not is_noise(pending):
        out.write(pending)
    out.flush()


if __name__ == "__main__":
    # Ctrl-C or a SIGTERM to the process group must not end the filter before the command's last words:
    # it ends when the pipe closes, i.e. when the command (and anything that inherited its stderr) exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    main()
