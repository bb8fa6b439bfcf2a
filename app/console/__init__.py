"""The web console: a static page at /console that uses the public API with a key the person pastes."""
