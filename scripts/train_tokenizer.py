"""Train a byte-level BPE tokenizer.

    python scripts/train_tokenizer.py --vocab-size 8192 --out tokenizer.json          # the stdlib corpus
    python scripts/train_tokenizer.py --vocab-size 32000 --source "corpus/*.txt" --out tok.json
"""
import sys
import time

from llmstack.cli import script_parser
from llmstack.data import DataError, load_corpus
from llmstack.tokenizer import Tokenizer


def main() -> None:
    parser = script_parser(__doc__, threads=False)  # tokenizer training is Python on one core
    parser.add_argument("--vocab-size", type=int, default=8192, help="bytes + merges + special tokens")
    parser.add_argument("--source", default="stdlib", help="'stdlib', a file or glob, or hf:NAME")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    try:
        train = load_corpus(args.source, "train", text_field=args.text_field)
        val = load_corpus(args.source, "val", text_field=args.text_field)
        tok = Tokenizer.train((row["text"] for row in train), args.vocab_size, verbose=True)
    except (DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    tok.save(args.out)
    elapsed = time.perf_counter() - t0
    texts = [row["text"] for row in val]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    print(f"wrote {args.out}: {tok.vocab_size} tokens in {elapsed:.1f}s (corpus reading included); "
          f"{n_bytes / n_tokens:.2f} bytes per token on the held-out split")


if __name__ == "__main__":
    main()
