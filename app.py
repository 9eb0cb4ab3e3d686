"""FLAG-TRADER Explorer: `streamlit run app.py`. Router only: sidebar (checkpoint + assumptions) and pages."""

import streamlit as st

from flag_model import ui

st.set_page_config(page_title="FLAG-TRADER Explorer", page_icon=":material/query_stats:", layout="wide")

PAGES = [
    st.Page("app_pages/overview.py", title="Overview", icon=":material/summarize:", default=True),
    st.Page("app_pages/tensors.py", title="Tensor tree", icon=":material/account_tree:"),
    st.Page("app_pages/architecture.py", title="Architecture check", icon=":material/rule:"),
    st.Page("app_pages/lora.py", title="LoRA", icon=":material/tune:"),
    st.Page("app_pages/attention.py", title="Attention", icon=":material/visibility:"),
    st.Page("app_pages/attributions.py", title="Attributions", icon=":material/insights:"),
    st.Page("app_pages/predictions.py", title="Predictions", icon=":material/candlestick_chart:"),
    st.Page("app_pages/whatif.py", title="What-if", icon=":material/science:"),
    st.Page("app_pages/hypotheses.py", title="Hypotheses", icon=":material/fact_check:"),
]

st.navigation(PAGES).run()
ui.sidebar()  # for a page that stopped before asking for the checkpoint; a no-op otherwise
