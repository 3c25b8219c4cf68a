"""The rank side: what runs inside each training process.

It imports only the standard library, pyzmq, msgpack and the shared formats
(``ranklog.wire``, ``ranklog.names``, ...), never ``ranklog.collector`` or
``ranklog.backends``, torch, numpy or an SDK.
"""
