"""Predicted against measured peak memory on the course model, over a grid of training steps.

    python -m helpers.benchmark                 # fp32 AdamW full fine-tuning, b 1-8 x t 64-256, +/- checkpointing
    python -m helpers.benchmark --batch 4 --seq 128

Prints a Markdown table (predicted, measured, error) and exits 1 if any prediction is off by more
than 10 %. A benchmark, not a test: the full grid takes about 6 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from .data import Corpus
from .estimate import Recipe, predict
from .memory import MiB, measure
from .models import load_model, load_tokenizer
from .train import make_train_step

TOLERANCE = 0.10


def run(batches, seqs, checkpointing=(False, True)) -> list[dict]:
    corpus, model = Corpus(load_tokenizer()), load_model()
    rows = []
    for ckpt, b, t in itertools.product(checkpointing, batches, seqs):
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay pretrained
        step = make_train_step(model, optimizer, corpus.train_batch(b, t), gradient_checkpointing=ckpt)
        step()  # steady state: AdamW's moments exist
        measured = measure(step, model=model, optimizer=optimizer)
        predicted = predict(model.config, Recipe(batch_size=b, seq_len=t, gradient_checkpointing=ckpt))
        rows.append({"batch": b, "seq": t, "checkpointing": ckpt, "predicted": predicted.peak,
                     "measured": measured.peak, "error": predicted.peak / measured.peak - 1,
                     "moment": predicted.result})
        print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['batch']} | {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{r['predicted'] / MiB:,.1f} | {r['measured'] / MiB:,.1f} | {100 * r['error']:+.2f} % | {r['moment']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seq", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args(argv)
    print("| batch | seq | checkpointing | predicted MiB | measured MiB | error | predicted moment |")
    print("|---|---|---|---|---|---|---|")
    rows = run(args.batch, args.seq)
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nworst error {100 * worst:.2f} % over {len(rows)} configurations (tolerance {100 * TOLERANCE:.0f} %)")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
