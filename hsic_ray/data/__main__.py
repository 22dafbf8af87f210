import sys

from hsic_ray.data.prepare import main

sys.exit(main())
