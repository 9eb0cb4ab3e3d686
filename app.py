"""FLAG-TRADER Explorer: `streamlit run app.py`. Router only: sidebar (checkpoint + assumptions) and pages."""

import streamlit as st

from app_pages import PAGES
from flag_model import ui

ui.freeze_long_lived()  # before this run: what earlier runs imported lives as long as the process
st.set_page_config(page_title="FLAG-TRADER Explorer", page_icon=":material/query_stats:", layout="wide")

st.navigation([st.Page(p.file, title=p.title, icon=p.icon, default=p.default) for p in PAGES]).run()
ui.sidebar()  # for a page that stopped before asking for the checkpoint; a no-op otherwise
