"""The backends' process: each backend handler on a runner that follows the journal from its
checkpoint, behind its rank policy. What a backend gets and may implement is written down in
``protocol.py``; one module per built-in backend."""
