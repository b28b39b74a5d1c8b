"""`mtdpo` with a probe: each rank appends the source rows of every batch it trains on to
$MTDPO_ROWS_DIR/rank-R.jsonl as {"step": s, "rows": [...]}, then runs the CLI as usual.

    torchrun --nproc_per_node 2 tests/record_rows.py train --data CACHE ...   (tests/train/test_multinode.py)
"""

import json
import os
from pathlib import Path

from mtdpo.cli import app
from mtdpo.train.trainer import MultiTurnDPOTrainer

compute_loss = MultiTurnDPOTrainer.compute_loss


def recording_compute_loss(self, model, inputs, *args, **kwargs):
    if model.training:  # the batches trained on, not evaluation
        rank = self.accelerator.process_index
        with open(Path(os.environ["MTDPO_ROWS_DIR"]) / f"rank-{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.state.global_step + 1, "rows": inputs["rows"].tolist()}) + "\n")
    return compute_loss(self, model, inputs, *args, **kwargs)


MultiTurnDPOTrainer.compute_loss = recording_compute_loss

if __name__ == "__main__":
    app(prog_name="mtdpo")
