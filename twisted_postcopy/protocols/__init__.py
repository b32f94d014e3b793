"""protocols subpackage of twisted_postcopy."""
