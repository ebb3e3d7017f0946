"""``python -m depthvlm_ros`` runs the ``depthvlm`` command."""

import sys

from depthvlm_ros.tools.cli import main

sys.exit(main())
