"""Pure plans: which tensors go in which file and the steps that make every output byte."""
