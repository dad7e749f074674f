"""Translation of the messages people read (Slicer's ``tr``; plain English without the application).

``_`` IS ``slicer.i18n.tr`` inside Slicer (not a wrapper: ``tr`` finds its
translation context from its caller's file). Messages are written with named
placeholders, ``_("model '{name}' is {ndim}D").format(name=..., ndim=...)``,
so translators move the values, never concatenated fragments.
"""

try:
    from slicer.i18n import tr as _  # the application (not in slicer-core)
except ImportError:

    def _(text: str) -> str:
        return text


__all__ = ["_"]
