"""The CLI, with the weights of one checkpoint (`SLOW_CHECKPOINT`, e.g. checkpoint-20) written slowly in small flushed
pieces, so that a test can SIGKILL the process in the middle of that write: a preemption during the minutes an 8B
checkpoint takes to write. Everything else is the real CLI.

    SLOW_CHECKPOINT=checkpoint-20 python tests/slow_checkpoint_write.py --config configs/demo.yaml ...
"""

import os
import runpy
import sys
import time
from pathlib import Path

import safetensors.torch
import transformers.modeling_utils

ROOT = Path(__file__).resolve().parent.parent
write_whole = transformers.modeling_utils.safe_save_file


def write_slowly(tensors, filename, metadata=None):
    if Path(filename).parent.name != os.environ["SLOW_CHECKPOINT"]:
        return write_whole(tensors, filename, metadata=metadata)
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        for start in range(0, len(data), 1 << 16):
            f.write(data[start : start + (1 << 16)])
            f.flush()
            time.sleep(0.2)


transformers.modeling_utils.safe_save_file = write_slowly
sys.path.insert(0, str(ROOT))
sys.argv = [str(ROOT / "train_diversity_simpo.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
