"""The interactive editor in the browser (issue 28): `p2p.app.ui.build_app(model, settings)` gives the Gradio page.

requests.py: page controls → edit settings; photos.py: upload and inversion; results.py: pictures and files;
ui.py: the page and its API (/edit, /attention, /invert). Only ui.py imports gradio (the `app` extra).
"""
