"""kdplug's built-in methods, one plugin module each, registered through the ``kdplug`` entry-point
group exactly as a third-party package registers its own."""
