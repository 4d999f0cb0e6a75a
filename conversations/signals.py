"""The typed event stream: the Python face of the tutorial's EventEmitter.

Every signal is sent after the batch that carried it has committed, once per newly stored event (a duplicate
sends nothing), with ``event`` (the TypedEvent) and ``conversation`` (the Conversation row, or None for an
unknown event without a conversation). ``stream_error`` is sent per reject with ``reject``.
"""
from django.dispatch import Signal

conversation_started = Signal()
conversation_updated = Signal()
conversation_ended = Signal()
conversation_wrapped_up = Signal()
unknown_event = Signal()
stream_error = Signal()
