"""Messenger adapters, one module per channel, registered in
``bot_platform.channels.BUILTIN_CHANNELS``."""
