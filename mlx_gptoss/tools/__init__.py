"""Tools the model can call, behind one interface (`Tool`) and one router (`ToolRouter`):
function tools (`functions`), the built-in `browser` and the OS-isolated `python` tool."""
from .base import Tool, ToolError, ToolRouter
from .browser import BrowserTool
from .functions import FunctionsTool
from .python import PythonTool

__all__ = ["Tool", "ToolError", "ToolRouter", "FunctionsTool", "BrowserTool", "PythonTool"]
