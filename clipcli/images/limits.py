"""The decoding guard's default, defined once, apart from the decoder: the CLI shows it in ``--help``
(``--max-megapixels``) without importing Pillow.

A 108 MP phone photo is ordinary, so Pillow's 89.5 Mpx bomb limit is too low; the limit is a guard
against files that would need gigabytes to decode, and one that the user can raise.
"""

DEFAULT_MAX_MEGAPIXELS = 250.0
DEFAULT_MAX_PIXELS = int(DEFAULT_MAX_MEGAPIXELS * 1_000_000)
