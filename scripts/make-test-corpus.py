#!/usr/bin/env python3
"""Writes English-like JSON Lines to stdout, for measuring `glatrain prepare` on big inputs.

Documents are random runs of paragraphs built from random sentences of the embedded Brown corpus
(data/brown-train.txt.gz), so the text has English words, punctuation and sentence lengths, but
no document repeats another. Each line is one object with the fields a crawled corpus has
(`id`, `url`, `text`); `prepare` reads `text` and skips the rest. Deterministic for a given seed.

    python3 scripts/make-test-corpus.py --gigabytes 5 | zstd -3 -T0 -q -o /tmp/corpus.jsonl.zst

Standard library only (Python 3.8+).
"""

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

BROWN = Path(__file__).resolve().parent.parent / "data" / "brown-train.txt.gz"


def sentences():
    text = gzip.decompress(BROWN.read_bytes()).decode("utf-8")
    out = []
    for paragraph in text.split("\n"):
        out.extend(s for s in re.split(r"(?<=[.!?]) (?=[A-Z\"])", paragraph.strip()) if s)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, required=True,
                        help="stop after about this many GB (1e9 bytes) of text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool = sentences()
    rng = random.Random(args.seed)
    limit = int(args.gigabytes * 1e9)
    written = 0
    out = sys.stdout.buffer
    doc = 0
    while written < limit:
        paragraphs = [" ".join(rng.choices(pool, k=rng.randint(1, 8)))
                      for _ in range(rng.randint(1, 12))]
        text = "\n".join(paragraphs)
        line = json.dumps({"id": f"doc-{doc:09d}", "url": f"https://example.com/{doc}",
                           "text": text}, ensure_ascii=False)
        out.write(line.encode("utf-8") + b"\n")
        written += len(text.encode("utf-8"))
        doc += 1
    print(f"{doc} documents, {written} bytes of text", file=sys.stderr)


if __name__ == "__main__":
    main()
