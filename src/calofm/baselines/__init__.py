"""Standard generative models, trained and judged in the same harness as calofm's own model."""
