"""python -m medusa_kernels.tree calibrate ...: grow a tree from measured head accuracies (see
``medusa_kernels.calibrate``)."""

from ..calibrate import main

raise SystemExit(main())
