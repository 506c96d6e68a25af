// Starts GraphiQL on walstream's own endpoint: queries and mutations over HTTP, subscriptions
// over graphql-transport-ws on the same path.
(function () {
  var url = new URL('/graphql', window.location.href);
  var socket = new URL(url);
  socket.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  var fetcher = GraphiQL.createFetcher({ url: url.href, subscriptionUrl: socket.href });
  ReactDOM.createRoot(document.getElementById('graphiql')).render(
    React.createElement(GraphiQL, { fetcher: fetcher, defaultEditorToolsVisibility: true })
  );
})();
