"""Write the model card: parameters and MACs of every registered network, as markdown.

    python scripts/model_card.py                            # print it
    python scripts/model_card.py --output docs/models.md    # regenerate the committed card
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cifar_lightning.models.card import model_card_markdown, model_card_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the card here instead of printing it")
    args = parser.parse_args(argv)
    card = model_card_markdown(model_card_rows())
    if args.output is None:
        print(card, end="")
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(card)


if __name__ == "__main__":
    main()
