"""The collector's receive loop: decode, validate, de-duplicate, journal, acknowledge; the
ranks' liveness and status; ``ranklog collect`` and ``ranklog replay``."""
