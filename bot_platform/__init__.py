"""The channel-agnostic core of the platform: settings, storage, flows, engine, delivery."""
