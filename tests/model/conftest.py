"""Model tests run the Triton scan under Triton's interpreter (no GPU here). Triton reads this
when the kernels are defined, so it is set before any test module imports them."""

import os

os.environ["TRITON_INTERPRET"] = "1"
