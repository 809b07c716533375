"""SPT: semi-parametric prompt tuning (a memory bank of prompts retrieved by the discrete prompt)
on stock transformers T5. See README.md (to be written) and the spec."""
