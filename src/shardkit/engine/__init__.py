"""The only code that writes: blocks, kernel copies, uploads, hashing, atomic commits."""
