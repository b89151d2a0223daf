"""Request handlers, grouped by what they touch: partition logs (``data``), topics and the
cluster (``cluster``), consumer groups and their offsets (``groups``). Each group's
``routes()`` maps API keys to coroutines taking a ``RequestContext`` and the decoded request
body, answering a response body (a dict holding the fields of every served version)."""
