"""procident: an RFC 1413 ident daemon for Linux."""

__version__ = "0.1.0"
