"""``python -m bertfast.pretrain`` (and ``torchrun --nproc_per_node=N -m bertfast.pretrain``)."""

import sys

from bertfast.pretrain.command import main

sys.exit(main())
