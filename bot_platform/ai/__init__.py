"""Optional AI answers with any OpenAI-compatible endpoint: FAQ-grounded answers, intent
routing to flows, escalation, with strict fallbacks. Off unless ``BOTP_AI__ENABLED=true``.

``config`` (settings) is light; ``knowledge`` (BM25 retrieval, kept current), ``budget``
(token reservations), ``assistant`` (the model call and its checks) and ``reply`` (the job
wiring) load only when AI is enabled.
"""
