"""What every cerana daemon shares: setting parsers and errors, logging to stderr, stop signals."""
