"""Spike forensics: what the spike kits captured during training (proxy/train/capture.py) say.

replay.py     read a kit, restore one of its states, replay its steps with the trainer's own
              step function (bitwise on CPU)
dissect.py    the dissection: where in the model, which data, does it come back, is it an
              optimizer instability (inspect_kit -> Inspection)
dissect_report.py  its report: report.md, figures, inspect.json
inspect_cli.py     proxy-inspect, the command line
curvature.py  sharpness and Adam's preconditioned sharpness by Lanczos (edge of stability)
edge.py       the trajectory into a spike: both sharpnesses against 2/eta and 38/eta, the
              Adam update's bimodality and its cosine with descent, step by step
              (proxy-inspect --edge; experiments/adam_edge_of_stability)
series.py     a checkpoint series (Hugging Face safetensors, proxy runs, kits) read tensor by
              tensor: updates, moving rows, logit bounds, Adam's RMS_t (proxy-inspect --series)
series_report.py   its report: series.md, figures, series.json
probe_forward.py   a forward pass of probe tokens through each checkpoint, one layer's weights in
              memory at a time: max attention logit per layer, log Z, loss (proxy-inspect --forward)
"""

from proxy.forensics.replay import (
    Kit,
    KitError,
    Replay,
    Training,
    fresh_batches,
    held_out_batch,
    held_out_loss,
    load_kit,
    replay,
    restore,
    states_equal,
    trainer_step,
)
from proxy.train.capture import BATCHES_FILE, KIT_JSON, STATE_FILES, SpikeCapture, find_kits

__all__ = [
    "BATCHES_FILE",
    "KIT_JSON",
    "STATE_FILES",
    "Kit",
    "KitError",
    "Replay",
    "SpikeCapture",
    "Training",
    "find_kits",
    "fresh_batches",
    "held_out_batch",
    "held_out_loss",
    "load_kit",
    "replay",
    "restore",
    "states_equal",
    "trainer_step",
]
