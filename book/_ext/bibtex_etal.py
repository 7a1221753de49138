"""Sphinx extension: render BibTeX's ``and others`` as "et al.", in citations and in the bibliography.

In BibTeX, ``author = {Pan and others}`` is the documented way to say "Pan et al." (the other authors are not
recorded). pybtex's Python styles, which sphinxcontrib-bibtex uses, treat ``others`` as a person called "others"
and print "Pan and others". This extension registers two styles that know better:

- ``author_year_etal`` (for ``bibtex_reference_style``): author-year citations; an author list that ends in
  ``others`` is cited as "First et al." whatever its length;
- ``plain_etal`` (for ``bibtex_default_style``): pybtex's ``plain`` bibliography (sorted by author, year, title)
  that prints such a list as "A. First, B. Second, et al.".

Loaded from ``_config.yml`` (``sphinx: local_extensions: {bibtex_etal: book/_ext/}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pybtex.plugin
from pybtex.richtext import Tag, Text
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.template import FieldIsMissing, first_of, node, optional, sentence, tag
from pybtex.style.template import field as bib_field
from pybtex.style.template import join as pybtex_join
from sphinxcontrib.bibtex.plugin import register_plugin
from sphinxcontrib.bibtex.style.referencing import PersonStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle
from sphinxcontrib.bibtex.style.template import join as sc_join

ET_AL = Tag("em", "et al.")


def _split_others(persons):
    """``(persons without a trailing "others", whether there was one)``."""
    persons = list(persons)
    if persons and str(persons[-1]).strip().lower() == "others":
        return persons[:-1], True
    return persons, False


def _persons(context, role):
    try:
        return context["entry"].persons[role]
    except KeyError:
        raise FieldIsMissing(role, context["entry"])


# ------------------------------------------------------------------------------------------- bibliography
@node
def names_etal(children, context, role, **kwargs):
    """pybtex's ``names`` node, with a trailing ``others`` printed as ", et al." (" et al." after one name)."""
    assert not children
    persons, others = _split_others(_persons(context, role))
    style = context["style"]
    formatted = [style.format_name(p, style.abbreviate_names) for p in persons]
    if not others:
        return pybtex_join(**kwargs)[formatted].format_data(context)
    listed = pybtex_join(sep=", ")[formatted].format_data(context)
    return Text(listed, ", " if len(formatted) > 1 else " ", ET_AL)


class PlainEtAlStyle(PlainStyle):
    """pybtex ``plain`` (sorted by author, year, title) with BibTeX's ``and others`` shown as "et al."."""

    def format_names(self, role, as_sentence=True):
        formatted = names_etal(role, sep=", ", sep2=" and ", last_sep=", and ")
        return sentence[formatted] if as_sentence else formatted


# ------------------------------------------------------------------------------------------- citations
@node
def ref_names_etal(children, data, role, **kwargs):
    """sphinxcontrib-bibtex's ``names`` node; a list ending in ``others`` is cited as "First et al."."""
    assert not children
    persons, others = _split_others(_persons(data, role))
    person = data["style"].person
    formatted = [person.style_plugin.format(p, person.abbreviate) for p in persons]
    if others and formatted:
        if kwargs.get("other") is not None:  # short form: the first name and "et al."
            return Text(sc_join()[formatted[:1]].format_data(data), kwargs["other"])
        listed = sc_join(sep=", ")[formatted].format_data(data)
        return Text(listed, ", " if len(formatted) > 1 else " ", ET_AL)
    return sc_join(**kwargs)[formatted].format_data(data)


@node
def ref_author_or_editor_or_title_etal(children, data, **kwargs):
    assert not children
    return first_of[
        optional[ref_names_etal("author", **kwargs)],
        optional[ref_names_etal("editor", **kwargs)],
        tag("em")[bib_field("title")],
    ].format_data(data)


@dataclass
class EtAlPersonStyle(PersonStyle):
    """sphinxcontrib-bibtex's person style, aware of BibTeX's ``and others``."""

    def names(self, role: str, full: bool):
        return ref_names_etal(role=role, sep=self.sep, sep2=self.sep2, last_sep=self.last_sep,
                              other=None if full else self.other)

    def author_or_editor_or_title(self, full: bool):
        return ref_author_or_editor_or_title_etal(sep=self.sep, sep2=self.sep2, last_sep=self.last_sep,
                                                  other=None if full else self.other)


@dataclass
class AuthorYearEtAlReferenceStyle(AuthorYearReferenceStyle):
    """The ``author_year`` referencing style with :class:`EtAlPersonStyle`."""

    person: PersonStyle = field(default_factory=EtAlPersonStyle)


def setup(app):
    pybtex.plugin.register_plugin("pybtex.style.formatting", "plain_etal", PlainEtAlStyle)
    register_plugin("sphinxcontrib.bibtex.style.referencing", "author_year_etal", AuthorYearEtAlReferenceStyle)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
