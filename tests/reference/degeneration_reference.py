#!/usr/bin/env python3
"""Reference for pruneval's degeneration figures: rep-n by its definition and intra-response
Self-BLEU-4 with nltk's sentence_bleu (SmoothingFunction().method1, uniform weights).

Words are str.lower().split(); sentences end after '.', '!' or '?' and at line breaks (blank ones
dropped), as pruneval splits them.

stdin:  {"texts": [...]}
stdout: {"rep": {"2": [per text or null], "3": [...], "4": [...]}, "self_bleu_4": [per text or null]}
"""
import json
import re
import sys

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu


def rep(words, n):
    if len(words) < n:
        return None
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams)


def sentences(text):
    parts = re.split(r"(?<=[.!?])|\n", text)
    return [p for p in parts if p.strip()]


def self_bleu(text):
    sents = [s.lower().split() for s in sentences(text)]
    if len(sents) < 2:
        return None
    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu(sents[:i] + sents[i + 1:], s, weights=(0.25,) * 4, smoothing_function=smooth)
        for i, s in enumerate(sents)
        if len(s) >= 4
    ]
    return sum(scores) / len(scores) if scores else None


def main():
    texts = json.load(sys.stdin)["texts"]
    words = [t.lower().split() for t in texts]
    out = {
        "rep": {str(n): [rep(w, n) for w in words] for n in (2, 3, 4)},
        "self_bleu_4": [self_bleu(t) for t in texts],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
