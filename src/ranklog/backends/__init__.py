"""The backends' process: each backend handler on a runner that follows the journal from its
checkpoint, behind its rank policy. One module per built-in backend."""
