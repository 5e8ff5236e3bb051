#!/usr/bin/env python
"""Write the model card: parameters and MACs of every registered network, as markdown.

python scripts/model_card.py                            # print it
python scripts/model_card.py --output docs/models.md    # regenerate the committed card
"""

from cifar_lightning.models.card import main

if __name__ == "__main__":
    main()
