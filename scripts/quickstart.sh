#!/usr/bin/env bash
# The main job, end to end on a CPU in a few minutes, with nothing downloaded but Python packages:
#   1. set up .venv (first run only),
#   2. write a synthetic video-classification dataset as real video files in the UCF101 subset
#      layout (the class is the colour of a moving shape: only the pixels tell),
#   3. convert it with convert_ucf101.py --src (8 frames per clip, the original's layout),
#   4. make a tiny random Phi-3.5-vision with the real tokenizer (python -m phi3v.tiny),
#   5. fine-tune it with finetune_hf_trainer_ucf101.py and print accuracy before and after.
# Usage: bash scripts/quickstart.sh [OUTPUT_FOLDER]   (default: quickstart_output)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=.venv/bin/python
OUT=${1:-quickstart_output}
start=$(date +%s)

rm -rf "$OUT"
$PY scripts/make_synthetic_videos.py --out_dir "$OUT/videos"
$PY convert_ucf101.py --src "$OUT/videos" --out_dir "$OUT/ucf101" --no-tqdm
$PY -m phi3v.tiny --output_dir "$OUT/tiny-phi3v"
# A randomly initialised tiny model learns from scratch: full fine-tuning, a high learning rate,
# 1 crop per frame (8 frames x 313 image tokens per clip) to keep the CPU busy for minutes, not hours.
$PY finetune_hf_trainer_ucf101.py \
  --model_name_or_path "$OUT/tiny-phi3v" --data_dir "$OUT/ucf101" --output_dir "$OUT/run" \
  --num_crops 1 --batch_size 8 --batch_size_per_gpu 8 --num_train_epochs 6 \
  --learning_rate 2e-3 --warmup_steps 10 --logging_steps 5 --max_new_tokens 8 \
  --dataloader_num_workers 2 --deepspeed none --no-tqdm

$PY - "$OUT/run" "$start" <<'PYEOF'
import json, sys, time
from pathlib import Path
run = Path(sys.argv[1])
before = json.loads((run / "eval_before.json").read_text())["accuracy"]
after = json.loads((run / "eval_after.json").read_text())["accuracy"]
print()
print(f"accuracy before fine-tuning: {before:.1%}   (chance: 10%)")
print(f"accuracy after fine-tuning:  {after:.1%}")
print(f"outputs: {run}/ (eval_before.json, eval_after.json, log_history.json, loss curve, confusion matrix, model)")
print(f"took {time.time() - float(sys.argv[2]):.0f} s")
PYEOF
