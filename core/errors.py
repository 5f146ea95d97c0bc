"""The errors a user can fix, shown as one line (CLI) or a 4xx JSON body (HTTP), never a traceback."""


class UserError(Exception):
    """Bad input, a missing file or a wrong option: the message says what to do."""


class ImageError(UserError):
    """An upload that is not a usable image (HTTP 400)."""


class UnsupportedImage(ImageError):
    """A real file of a type Pillow cannot decode: PDF, SVG, text (HTTP 415)."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit, judged from its header (HTTP 413)."""
