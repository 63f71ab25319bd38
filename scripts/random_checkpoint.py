"""Write a checkpoint of random weights with every name and shape of a released file, for memory measurements.

python scripts/random_checkpoint.py --keys ../shared/sd-keys/keys_sdxl.txt --out /big/sd_xl_base_1.0.safetensors
python scripts/random_checkpoint.py --keys ../shared/sd-keys/keys_sd3_medium.txt \
    --keys ../shared/sd-keys/keys_sd3_text_encoders.txt --dtype fp16 --out /big/sd3_medium_incl_clips_t5xxlfp16.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from models.errors import UserError  # noqa: E402
from models.loader import resolve_dtype  # noqa: E402
from p2p.experiments.random_files import read_key_list, write_random_file  # noqa: E402
from scripts._cli import fail  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=Path, action="append", required=True, help="a key list (repeat to combine)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write (never overwritten)")
    parser.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default fp16, as released files)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        shapes = {name: shape for path in args.keys for name, shape in read_key_list(path).items()}
        elements = write_random_file(args.out, shapes, dtype=resolve_dtype(args.dtype), seed=args.seed)
    except UserError as error:
        fail(str(error))
    print(f"{args.out}: {len(shapes)} tensors, {elements / 1e9:.3f} B weights")


if __name__ == "__main__":
    main()
